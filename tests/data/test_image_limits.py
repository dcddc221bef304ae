"""Image size limits, read from the header before any pixel is decoded: decompression bombs,
degenerate and extreme-aspect images are refused in one line naming the image."""

from __future__ import annotations

import warnings

import pytest
from PIL import Image

from vlmcredit.data.images import MAX_PIXELS, ImageLoadError, load_image, size_problem


@pytest.mark.parametrize(
    ("size", "refused"),
    [
        ((4, 4), None),
        ((3, 50), "smaller than 4 px"),
        ((9459, 9459), None),  # 89,472,681 px: just under the limit
        ((9460, 9460), "decompression-bomb guard"),
        ((4, 800), None),
        ((4, 801), "aspect ratio over 200:1"),
    ],
)
def test_size_limits(size, refused) -> None:
    problem = size_problem(*size)
    assert problem is None if refused is None else refused in problem
    assert 9459 * 9459 <= MAX_PIXELS < 9460 * 9460


def test_a_bomb_between_one_and_two_times_pils_limit_is_refused_without_decoding(tmp_path):
    # PIL only warns here (it raises from 2x its limit) and would decode 0.3 GB of RGB
    Image.new("1", (10_000, 10_000)).save(tmp_path / "big.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning escapes either
        with pytest.raises(ImageLoadError, match=r"10000 x 10000 px \(100 Mpx\) is over"):
            load_image("big.png", tmp_path, "rollouts.jsonl row 0 image 0")


def test_an_extreme_aspect_image_is_refused_naming_it(tmp_path) -> None:
    Image.new("RGB", (1001, 5)).save(tmp_path / "strip.png")
    with pytest.raises(ImageLoadError) as info:
        load_image("strip.png", tmp_path, "rollouts.jsonl row 2 image 0")
    message = str(info.value)
    assert message.startswith("rollouts.jsonl row 2 image 0: ") and "strip.png" in message
    assert "crop or pad it" in message and "\n" not in message
