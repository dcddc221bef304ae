"""Pieces of the report checked against brute force and hand formulas."""

from __future__ import annotations

import numpy as np

from tests.reports.page import Page
from vlmcredit.reports.figures import _composite, _image_canvas, _raster
from vlmcredit.reports.html import esc, table
from vlmcredit.reports.tokens import ShadeScale, shaded_tokens


def grid_boxes(rows: int, cols: int, width: float, height: float) -> np.ndarray:
    """Cell boxes (x0, y0, x1, y1) of a rows x cols grid over a width x height image."""
    xs = np.linspace(0, width, cols + 1)
    ys = np.linspace(0, height, rows + 1)
    cells = [(r, c) for r in range(rows) for c in range(cols)]
    return np.array([[xs[c], ys[r], xs[c + 1], ys[r + 1]] for r, c in cells], np.float64)


def test_raster_matches_point_in_box_brute_force() -> None:
    """Every canvas pixel takes the value of the cell box containing its centre."""
    boxes = grid_boxes(rows=5, cols=7, width=330, height=250)  # 47.14 px wide cells
    values = np.arange(len(boxes), dtype=np.float64) + 1
    scale = 0.6137  # canvas pixels per original pixel: no cell edge on a half pixel
    shape = (round(250 * scale), round(330 * scale))
    got = _raster(values, boxes, shape, scale)
    mismatches = 0
    for y in range(shape[0]):
        for x in range(shape[1]):
            ox, oy = (x + 0.5) / scale, (y + 0.5) / scale
            inside = [
                v
                for (x0, y0, x1, y1), v in zip(boxes, values, strict=True)
                if x0 <= ox < x1 and y0 <= oy < y1
            ]
            mismatches += got[y, x] != inside[0]
    assert mismatches == 0


def test_raster_leaves_uncovered_pixels_empty_and_composite_keeps_them() -> None:
    boxes = np.array([[0, 0, 50, 50]], dtype=np.float64)  # one cell in a 100 x 100 image
    raster = _raster(np.array([2.0]), boxes, (100, 100), 1.0)
    assert np.isnan(raster[60:, 60:]).all() and (raster[:50, :50] == 2.0).all()
    background = np.full((100, 100, 3), 77, dtype=np.uint8)
    out = _composite(background, raster, vmax=2.0)
    assert (out[60:, 60:] == 77).all()  # no cell: the picture unchanged
    assert (out[:50, :50] != 77).any()  # full-strength cell: coloured


def test_blank_canvas_from_boxes_when_no_thumbnail() -> None:
    boxes = grid_boxes(12, 16, 896, 672)
    background, scale, width, height = _image_canvas(0, boxes, None)
    assert (width, height) == (896, 672)
    assert background.shape == (336, 448, 3) and scale == 448 / 896
    thumb = np.zeros((100, 200, 3), np.uint8)
    _, scale, width, height = _image_canvas(0, boxes, (thumb, 0.25))
    assert (scale, width, height) == (0.25, 800, 400)


def test_shade_buckets_by_hand() -> None:
    values = np.array([0.0, 0.05, 0.1, 0.5, 0.99, 1.0, 3.0])
    scale = ShadeScale(0.0, 1.0)
    assert scale.buckets(values).tolist() == [0, 0, 1, 5, 9, 9, 9]
    fitted = ShadeScale.fit(np.linspace(0, 1, 201))
    assert fitted.lo == 0.0 and abs(fitted.hi - 0.995) < 1e-12
    assert ShadeScale.fit(np.full(5, 0.3)).hi > 0.3  # flat values: a usable range


def test_shaded_tokens_markup() -> None:
    tokens = ["a", "<b>", " c", "&"]
    html = shaded_tokens(tokens, np.array([0, 3, 0, 9]), np.array([False, False, True, False]), 3)
    page = Page(html)
    run = page.token_runs[0]
    assert run.parts == [(None, "a"), ("s3", "<b>"), ("m0", " c")]
    assert "Truncated: showing the first 3 of 4 tokens" in page.all_text()
    assert "<b>" not in html.replace("&lt;b&gt;", "")


def test_table_and_esc_escape_attributes_and_content() -> None:
    nasty = '"><script>x</script>'
    page = Page(table([nasty], [[nasty, 1.23456789, None, True]]))
    assert not page.find("script")
    assert page.tables[0].headers == [nasty]
    assert page.tables[0].rows == [[nasty, "1.235", "–", "yes"]]
    assert esc("'\"<>&") == "&#x27;&quot;&lt;&gt;&amp;"
