"""Synthetic MME: rendered images with honest yes/no pairs, in MME's folder and parquet formats.

Only categories whose answers follow from the rendered pixels are synthesised: existence, count,
position, color (shapes), OCR (a rendered word) and numerical_calculation (a rendered sum).
Celebrity, landmark, translation and the like need real-world content and are not faked.
Every image gets two questions, the "Yes" one first, each ending " Please answer yes or no.";
all of these categories keep image and answer file side by side, as MME does.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmcredit.data.mme import MMESet, canonical_name, read_mme
from vlmcredit.errors import VlmCreditError

SYNTH_CATEGORIES = ("existence", "count", "position", "color", "OCR", "numerical_calculation")
# Saturated, well-separated fills; drawn without anti-aliasing so shape pixels are exact.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 150, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 200, 20),
    "purple": (130, 50, 170),
    "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle")
BACKGROUND = (255, 255, 255)
IMAGE_SIZE = (336, 280)  # width, height: multiples of 28, Qwen's merged patch
SUFFIX = " Please answer yes or no."
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight")
WORDS = (
    "APPLE", "BRIDGE", "CANDLE", "DOLPHIN", "ENGINE", "FOREST", "GARDEN", "HARBOR", "ISLAND",
    "JACKET", "KETTLE", "LADDER", "MARKET", "NEEDLE", "ORANGE", "PENCIL", "RABBIT", "SILVER",
    "TICKET", "VALLEY", "WINDOW", "YELLOW", "CASTLE", "PLANET",
)  # fmt: skip


@dataclass(frozen=True)
class SynthShape:
    """A filled shape centred at (cx, cy) inside the square of half-side r."""

    kind: str
    color: str
    cx: int
    cy: int
    r: int

    @property
    def box(self) -> tuple[int, int, int, int]:
        return (self.cx - self.r, self.cy - self.r, self.cx + self.r, self.cy + self.r)


@dataclass(frozen=True)
class SynthItem:
    """One synthetic image with its (question, answer) pairs and what was drawn."""

    category: str
    name: str  # file name, e.g. "0003.png"
    image: Any  # PIL RGB image
    questions: tuple[tuple[str, str], ...]  # ((q, "Yes"), (q, "No")); () for render_shapes
    shapes: tuple[SynthShape, ...] = ()
    text: str = ""  # the rendered word or sum


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # scalable default font, Pillow >= 10.1
    except TypeError:
        return ImageFont.load_default()


def _place(rng: random.Random, radii: list[int], gap: int = 10) -> list[tuple[int, int]]:
    """Centres for shapes of the given half-sides, boxes apart by `gap`, inside the image."""
    w, h = IMAGE_SIZE
    for _ in range(1000):
        centres: list[tuple[int, int]] = []
        for r in radii:
            for _ in range(200):
                cx, cy = rng.randint(r + 6, w - r - 7), rng.randint(r + 6, h - r - 7)
                if all(
                    abs(cx - x) > r + rr + gap or abs(cy - y) > r + rr + gap
                    for (x, y), rr in zip(centres, radii, strict=False)  # placed so far
                ):
                    centres.append((cx, cy))
                    break
            else:
                break
        if len(centres) == len(radii):
            return centres
    raise RuntimeError("could not place shapes; too many for the image")  # a bug, not user input


def _paint(image: Any, shapes: Iterable[SynthShape], fills: Iterable[Any]) -> Any:
    from PIL import ImageDraw

    draw = ImageDraw.Draw(image)
    for s, fill in zip(shapes, fills, strict=True):
        x0, y0, x1, y1 = s.box
        if s.kind == "circle":
            draw.ellipse(s.box, fill=fill)
        elif s.kind == "square":
            draw.rectangle(s.box, fill=fill)
        else:  # triangle pointing up; its centre (cx, cy) lies inside at half height
            draw.polygon([(s.cx, y0), (x0, y1), (x1, y1)], fill=fill)
    return image


def _draw(shapes: Sequence[SynthShape]) -> Any:
    from PIL import Image

    return _paint(
        Image.new("RGB", IMAGE_SIZE, BACKGROUND), shapes, [COLORS[s.color] for s in shapes]
    )


def shape_index_map(shapes: Sequence[SynthShape]) -> Any:
    """(H, W) uint8 array: 1 + the index of the shape each pixel of the drawn image belongs to,
    0 for background; the same geometry as the image, pixel for pixel."""
    import numpy as np
    from PIL import Image

    return np.asarray(_paint(Image.new("L", IMAGE_SIZE, 0), shapes, range(1, len(shapes) + 1)))


def _shapes(rng: random.Random, kinds: list[str], colors: list[str]) -> tuple[SynthShape, ...]:
    radii = [rng.randint(16, 30) for _ in kinds]
    centres = _place(rng, radii)
    return tuple(
        SynthShape(k, c, x, y, r)
        for k, c, (x, y), r in zip(kinds, colors, centres, radii, strict=True)
    )


def render_shapes(rng: random.Random, n: int, name: str, category: str = "shapes") -> SynthItem:
    """An image of `n` shapes of random kind and colour, with no questions (descriptions only).

    The built-in model's warm-up draws single shapes from here: every image token that is not
    background belongs to the one object, so its colour, kind and place are learnable before the
    questions that need one object told apart from another.
    """
    colors = list(COLORS)
    kinds = [rng.choice(SHAPES) for _ in range(n)]
    shapes = _shapes(rng, kinds, [rng.choice(colors) for _ in kinds])
    return SynthItem(category, name, _draw(shapes), (), shapes)


def _text_image(text: str, rng: random.Random) -> Any:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", IMAGE_SIZE, BACKGROUND)
    draw = ImageDraw.Draw(img)
    font = _font(rng.randint(36, 48))
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    w, h = IMAGE_SIZE
    x = rng.randint(12, max(12, w - (right - left) - 12)) - left
    y = rng.randint(12, max(12, h - (bottom - top) - 12)) - top
    draw.text((x, y), text, fill=(0, 0, 0), font=font)
    return img


def render_item(category: str, rng: random.Random, name: str) -> SynthItem:
    """Render one image of `category` and its honest Yes / No question pair."""
    colors = list(COLORS)
    if category == "existence":
        kinds = rng.sample(SHAPES, rng.randint(1, 2))
        absent = rng.choice([k for k in SHAPES if k not in kinds])
        drawn = kinds + rng.choices(kinds, k=rng.randint(0, 2))  # some kinds more than once
        shapes = _shapes(rng, drawn, [rng.choice(colors) for _ in drawn])
        yes = f"Is there a {rng.choice(kinds)} in this image?"
        no = f"Is there a {absent} in this image?"
    elif category == "count":
        kind = rng.choice(SHAPES)
        n = rng.randint(1, 5)
        other = rng.choice([k for k in SHAPES if k != kind])
        drawn = [kind] * n + [other] * rng.randint(0, 2)  # distractors of another shape
        shapes = _shapes(rng, drawn, [rng.choice(colors) for _ in drawn])
        wrong = rng.choice([m for m in (n - 1, n + 1, n + 2) if m >= 1])
        yes, no = (_count_question(kind, m) for m in (n, wrong))
    elif category == "position":
        a_kind, b_kind = rng.sample(SHAPES, 2)
        a_color, b_color = rng.sample(colors, 2)
        rel, opposite = rng.choice(
            [("on the left of", "on the right of"), ("on the right of", "on the left of"),
             ("above", "below"), ("below", "above")]
        )  # fmt: skip
        shapes = _position_pair(rng, (a_kind, a_color), (b_kind, b_color), rel)
        a, b = f"the {a_color} {a_kind}", f"the {b_color} {b_kind}"
        yes, no = f"Is {a} {rel} {b}?", f"Is {a} {opposite} {b}?"
    elif category == "color":
        kind, distractor = rng.sample(SHAPES, 2)
        color, wrong, d_color = rng.sample(colors, 3)
        drawn = [kind] + [distractor] * rng.randint(0, 1)
        shapes = _shapes(rng, drawn, [color, d_color][: len(drawn)])
        yes = f"Is the {kind} in this image {color}?"
        no = f"Is the {kind} in this image {wrong}?"
    elif category == "OCR":
        word, wrong = rng.sample(WORDS, 2)
        qa = ((f'Is the word in the image "{word}"?{SUFFIX}', "Yes"),
              (f'Is the word in the image "{wrong}"?{SUFFIX}', "No"))  # fmt: skip
        return SynthItem(category, name, _text_image(word, rng), qa, text=word)
    elif category == "numerical_calculation":
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        total = a + b
        wrong = total + rng.choice([d for d in range(-10, 11) if d])
        text = f"{a} + {b} ="
        q = "Is the answer to the arithmetic question in the image {}?"
        qa = ((q.format(total) + SUFFIX, "Yes"), (q.format(wrong) + SUFFIX, "No"))
        return SynthItem(category, name, _text_image(text, rng), qa, text=text)
    else:
        raise VlmCreditError(
            f"MME category {category!r} is not synthesised (its answers need real content); "
            f"synthetic categories: {', '.join(SYNTH_CATEGORIES)}"
        )
    qa = ((yes + SUFFIX, "Yes"), (no + SUFFIX, "No"))
    return SynthItem(category, name, _draw(shapes), qa, shapes)


def _count_question(kind: str, m: int) -> str:
    if m == 1:
        return f"Is there exactly one {kind} in this image?"
    return f"Are there exactly {NUMBER_WORDS[m]} {kind}s in this image?"


def _position_pair(
    rng: random.Random, a: tuple[str, str], b: tuple[str, str], rel: str
) -> tuple[SynthShape, ...]:
    """Two shapes whose boxes are fully separated along the relation's axis."""
    w, h = IMAGE_SIZE
    ra, rb = rng.randint(18, 34), rng.randint(18, 34)
    horizontal = "left" in rel or "right" in rel
    length = w if horizontal else h
    # first shape in the low half of the axis, second in the high half, 16 px apart at least
    lo = rng.randint(ra + 6, length // 2 - ra - 8)
    hi = rng.randint(length // 2 + rb + 8, length - rb - 7)
    first_is_a = rel in ("on the left of", "above")
    pos_a, pos_b = (lo, hi) if first_is_a else (hi, lo)
    other_a = rng.randint(ra + 6, (h if horizontal else w) - ra - 7)
    other_b = rng.randint(rb + 6, (h if horizontal else w) - rb - 7)
    if horizontal:
        return (SynthShape(*a, pos_a, other_a, ra), SynthShape(*b, pos_b, other_b, rb))
    return (SynthShape(*a, other_a, pos_a, ra), SynthShape(*b, other_b, pos_b, rb))


def _check_categories(categories: Iterable[str] | None) -> list[str]:
    if categories is None:
        return list(SYNTH_CATEGORIES)
    out = []
    for name in categories:
        canon = canonical_name(name)
        if canon not in SYNTH_CATEGORIES:
            raise VlmCreditError(
                f"cannot synthesise MME category {name!r}; synthetic categories: "
                f"{', '.join(SYNTH_CATEGORIES)}"
            )
        out.append(canon)
    return out


def synth_items(category: str, n: int, seed: int) -> list[SynthItem]:
    """The first `n` synthetic items of `category` for `seed` (same seed -> same items)."""
    (category,) = _check_categories([category])
    # One stream per category so a category's images do not depend on which others are asked.
    rng = random.Random(f"vlmcredit-mme-synth:{seed}:{category}")
    return [render_item(category, rng, f"{i:04d}.png") for i in range(n)]


def write_synthetic_mme(
    out_dir: str | Path,
    images_per_category: int,
    seed: int,
    categories: Iterable[str] | None = None,
) -> dict[str, int]:
    """Write synthetic MME in the original folder layout; returns images written per category."""
    if images_per_category < 1:
        raise VlmCreditError(f"images_per_category must be >= 1, got {images_per_category}")
    root = Path(out_dir)
    counts = {}
    for category in _check_categories(categories):
        cat_dir = root / category
        cat_dir.mkdir(parents=True, exist_ok=True)
        items = synth_items(category, images_per_category, seed)
        for item in items:
            item.image.save(cat_dir / item.name, format="PNG")
            lines = "".join(f"{q}\t{a}\n" for q, a in item.questions)
            (cat_dir / item.name).with_suffix(".txt").write_text(lines, encoding="utf-8")
        counts[category] = len(items)
    return counts


def write_synthetic_mme_parquet(source: MMESet | str | Path, out_path: str | Path) -> Path:
    """Write an MME set (or the folder/parquet it is read from) in the lmms-lab parquet format.

    Columns: question_id (the image's relative path "category/filename", as lmms-lab has it),
    image (struct{bytes: binary, path: string}), question, answer ("Yes"/"No"), category.
    Hugging Face feature metadata is included so `datasets` decodes the image column too.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    mme = source if isinstance(source, MMESet) else read_mme(source)
    cache: dict[str, bytes] = {}

    def blob(ref: str | bytes) -> bytes:
        if isinstance(ref, bytes):
            return ref
        if ref not in cache:
            cache[ref] = Path(ref).read_bytes()
        return cache[ref]

    qs = mme.questions
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    images = [{"bytes": blob(q.image_ref), "path": q.image_id.rsplit("/", 1)[-1]} for q in qs]
    table = pa.table(
        {
            "question_id": pa.array([q.image_id for q in qs], pa.string()),
            "image": pa.array(images, image_type),
            "question": pa.array([q.question for q in qs], pa.string()),
            "answer": pa.array([q.answer for q in qs], pa.string()),
            "category": pa.array([q.category for q in qs], pa.string()),
        }
    )
    value = {"dtype": "string", "_type": "Value"}
    features = {c: value for c in ("question_id", "question", "answer", "category")}
    features["image"] = {"_type": "Image"}
    hf = {"info": {"features": {k: features[k] for k in table.column_names}}}
    table = table.replace_schema_metadata({"huggingface": json.dumps(hf)})
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out)
    return out
