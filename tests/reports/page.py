"""Parse a report page with html.parser: tags, text, tables and token runs, for assertions."""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field
from html.parser import HTMLParser

VOID = {"meta", "link", "img", "br", "hr", "input"}


@dataclass
class Table:
    caption: str = ""
    headers: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)


@dataclass
class TokenRun:
    """One `<div class="tokens">`: the parts in order, (class or None for bare text, text)."""

    classes: str
    parts: list[tuple[str | None, str]] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(t for _, t in self.parts)

    @property
    def elements(self) -> list[tuple[str | None, str]]:
        return [p for p in self.parts if p[0] is not None]


class Page(HTMLParser):
    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.tables: list[Table] = []
        self.token_runs: list[TokenRun] = []
        self.ids: list[str] = []
        self._stack: list[str] = []
        self._table: Table | None = None
        self._cell: list[str] | None = None
        self._row: list[str] | None = None
        self._in_caption = False
        self._tokens: TokenRun | None = None
        self._token_class: str | None = None
        self.feed(html)
        self.close()

    # -- parser callbacks -----------------------------------------------------------------------
    def handle_starttag(self, tag, attrs):
        attrs_d = dict(attrs)
        self.tags.append((tag, attrs_d))
        if attrs_d.get("id"):
            self.ids.append(attrs_d["id"])
        if tag not in VOID:
            self._stack.append(tag)
        if tag == "table":
            self._table = Table()
        elif tag == "caption":
            self._in_caption = True
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "div" and "tokens" in (attrs_d.get("class") or "").split():
            self._tokens = TokenRun(attrs_d.get("class") or "")
        elif tag == "i" and self._tokens is not None:
            self._token_class = attrs_d.get("class")

    def handle_endtag(self, tag):
        if self._stack and self._stack[-1] == tag:
            self._stack.pop()
        if tag == "table" and self._table is not None:
            self.tables.append(self._table)
            self._table = None
        elif tag == "caption":
            self._in_caption = False
        elif tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None and self._table is not None:
            if "thead" in self._stack:
                self._table.headers = self._row
            else:
                self._table.rows.append(self._row)
            self._row = None
        elif tag == "div" and self._tokens is not None:
            self.token_runs.append(self._tokens)
            self._tokens = None
        elif tag == "i":
            self._token_class = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)
        if self._in_caption and self._table is not None:
            self._table.caption += data
        if self._tokens is not None:
            self._tokens.parts.append((self._token_class, data))

    # -- queries --------------------------------------------------------------------------------
    def all_text(self) -> str:
        return "".join(self.text)

    def find(self, name: str) -> list[dict[str, str | None]]:
        return [a for t, a in self.tags if t == name]

    def table(self, caption_start: str) -> Table:
        return next(t for t in self.tables if t.caption.startswith(caption_start))


def png_of(img_attrs: dict[str, str | None]):
    """The embedded image as a Pillow image (fails if it is not a PNG data URI)."""
    from PIL import Image

    src = img_attrs["src"] or ""
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix), src[:40]
    image = Image.open(io.BytesIO(base64.b64decode(src[len(prefix) :])))
    image.load()
    return image
