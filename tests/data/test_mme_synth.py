"""Synthetic MME: determinism, question pairs, honest pixels, parquet export."""

from __future__ import annotations

import json
import re
from collections import deque
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vlmcredit.data.mme import read_mme
from vlmcredit.data.mme_synth import (
    BACKGROUND,
    COLORS,
    NUMBER_WORDS,
    SUFFIX,
    SYNTH_CATEGORIES,
    synth_items,
    write_synthetic_mme,
    write_synthetic_mme_parquet,
)
from vlmcredit.errors import VlmCreditError


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _components(path: Path) -> list[dict]:
    """Connected non-background regions (4-neighbour) with bbox, pixel count, colours, kind."""
    arr = np.asarray(Image.open(path).convert("RGB"))
    mask = np.any(arr != np.array(BACKGROUND, dtype=arr.dtype), axis=2)
    seen = np.zeros_like(mask)
    h, w = mask.shape
    out = []
    for y0, x0 in zip(*np.nonzero(mask), strict=True):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        queue, pixels = deque([(y0, x0)]), []
        while queue:
            y, x = queue.popleft()
            pixels.append((y, x))
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        ys, xs = np.array(pixels).T
        box = (xs.min(), ys.min(), xs.max(), ys.max())
        fill = len(pixels) / ((box[2] - box[0] + 1) * (box[3] - box[1] + 1))
        # A filled square fills its box, a circle ~pi/4 of it, an upward triangle ~half.
        kind = "square" if fill > 0.93 else "circle" if fill > 0.68 else "triangle"
        colours = {tuple(int(v) for v in c) for c in arr[ys, xs]}
        out.append({"box": box, "kind": kind, "colours": colours})
    return out


def _colour_name(colours: set) -> str:
    assert len(colours) == 1, "shapes are drawn flat, without anti-aliasing"
    (rgb,) = colours
    return next(name for name, value in COLORS.items() if value == rgb)


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    counts = write_synthetic_mme(tmp_path / "a", 3, seed=7)
    write_synthetic_mme(tmp_path / "b", 3, seed=7)
    write_synthetic_mme(tmp_path / "c", 3, seed=8)
    a, b, c = (_files(tmp_path / d) for d in "abc")
    assert counts == {cat: 3 for cat in SYNTH_CATEGORIES}
    assert len(a) == 6 * 3 * 2 and a == b
    assert a.keys() == c.keys() and a != c
    # a category's images do not depend on which other categories were asked for
    write_synthetic_mme(tmp_path / "d", 3, seed=7, categories=["color"])
    assert _files(tmp_path / "d") == {k: v for k, v in a.items() if k.startswith("color/")}


def test_each_image_has_one_yes_then_one_no_side_by_side(tmp_path: Path) -> None:
    write_synthetic_mme(tmp_path, 4, seed=1)
    for cat in SYNTH_CATEGORIES:
        pngs = sorted((tmp_path / cat).glob("*.png"))
        assert len(pngs) == 4 and not (tmp_path / cat / "images").exists()
        for png in pngs:
            img = Image.open(png)
            assert img.format == "PNG" and min(img.size) >= 200 and max(img.size) <= 400
            lines = png.with_suffix(".txt").read_text().splitlines()
            assert [line.split("\t")[1] for line in lines] == ["Yes", "No"]
            questions = [line.split("\t")[0] for line in lines]
            assert all(q.endswith(SUFFIX) for q in questions) and questions[0] != questions[1]


def test_existence_color_count_position_are_honest(tmp_path: Path) -> None:
    write_synthetic_mme(tmp_path, 6, seed=3, categories=["existence", "count", "color", "position"])
    for item in synth_items("existence", 6, seed=3):
        comps = _components(tmp_path / "existence" / item.name)
        kinds = {c["kind"] for c in comps}
        assert kinds == {s.kind for s in item.shapes} and len(comps) == len(item.shapes)
        present = re.search(r"Is there a (\w+) in", item.questions[0][0]).group(1)
        absent = re.search(r"Is there a (\w+) in", item.questions[1][0]).group(1)
        assert present in kinds and absent not in kinds
    for item in synth_items("color", 6, seed=3):
        comps = _components(tmp_path / "color" / item.name)
        kind, colour = re.search(
            r"Is the (\w+) in this image (\w+)\?", item.questions[0][0]
        ).groups()
        _, wrong = re.search(r"Is the (\w+) in this image (\w+)\?", item.questions[1][0]).groups()
        (target,) = [c for c in comps if c["kind"] == kind]
        assert _colour_name(target["colours"]) == colour != wrong
        arr = np.asarray(Image.open(tmp_path / "color" / item.name))
        assert tuple(arr[item.shapes[0].cy, item.shapes[0].cx]) == COLORS[colour]
    for item in synth_items("count", 6, seed=3):
        comps = _components(tmp_path / "count" / item.name)
        word, kind = re.search(r"exactly (\w+) (\w+?)s? in", item.questions[0][0]).groups()
        wrong = re.search(r"exactly (\w+) ", item.questions[1][0]).group(1)
        n = sum(c["kind"] == kind for c in comps)
        assert NUMBER_WORDS.index(word) == n != NUMBER_WORDS.index(wrong)
    rel_axis = {
        "on the left of": (0, 2),
        "on the right of": (2, 0),
        "above": (1, 3),
        "below": (3, 1),
    }
    for item in synth_items("position", 6, seed=3):
        comps = _components(tmp_path / "position" / item.name)
        pattern = (
            r"Is the (\w+) (\w+) (on the left of|on the right of|above|below) the (\w+) (\w+)\?"
        )
        ca, ka, rel, cb, kb = re.search(pattern, item.questions[0][0]).groups()
        (a,) = [c for c in comps if c["kind"] == ka and _colour_name(c["colours"]) == ca]
        (b,) = [c for c in comps if c["kind"] == kb and _colour_name(c["colours"]) == cb]
        lo, hi = rel_axis[rel]  # a's far edge lies strictly before b's near edge on that axis
        if rel in ("on the left of", "above"):
            assert a["box"][hi] < b["box"][lo]
        else:
            assert a["box"][lo] > b["box"][hi]


def test_text_categories_render_and_answer_consistently() -> None:
    for item in synth_items("numerical_calculation", 5, seed=2):
        a, b = map(int, re.fullmatch(r"(\d+) \+ (\d+) =", item.text).groups())
        yes = int(re.search(r"image (\d+)\?", item.questions[0][0]).group(1))
        no = int(re.search(r"image (\d+)\?", item.questions[1][0]).group(1))
        assert yes == a + b != no
        assert (np.asarray(item.image) < 100).all(axis=2).sum() > 200  # dark text was drawn
    for item in synth_items("OCR", 5, seed=2):
        assert f'"{item.text}"' in item.questions[0][0] and item.text not in item.questions[1][0]
        arr = np.asarray(item.image)
        assert (arr < 100).all(axis=2).sum() > 200 and (arr == 255).all(axis=2).mean() > 0.8


def test_unfaithful_or_bad_requests_are_refused(tmp_path: Path) -> None:
    with pytest.raises(VlmCreditError, match=r"text_translation.*synthetic categories"):
        write_synthetic_mme(tmp_path, 2, seed=0, categories=["text_translation"])
    with pytest.raises(VlmCreditError, match="cannot synthesise"):
        synth_items("celebrity", 1, seed=0)
    with pytest.raises(VlmCreditError, match="images_per_category"):
        write_synthetic_mme(tmp_path, 0, seed=0)


def test_parquet_export_has_the_lmms_lab_schema(tmp_path: Path) -> None:
    write_synthetic_mme(tmp_path / "mme", 2, seed=5, categories=["OCR", "count"])
    out = write_synthetic_mme_parquet(tmp_path / "mme", tmp_path / "mme.parquet")
    table = pq.read_table(out)
    assert table.column_names == ["question_id", "image", "question", "answer", "category"]
    assert table.schema.field("image").type == pa.struct(
        [("bytes", pa.binary()), ("path", pa.string())]
    )
    rows = table.to_pylist()
    assert len(rows) == 8 and rows[0]["question_id"] == "count/0000.png"
    assert rows[0]["image"]["bytes"] == (tmp_path / "mme" / "count" / "0000.png").read_bytes()
    assert {r["answer"] for r in rows} == {"Yes", "No"}
    features = json.loads(table.schema.metadata[b"huggingface"])["info"]["features"]
    assert features["image"] == {"_type": "Image"}
    assert read_mme(out).layout == "parquet"
