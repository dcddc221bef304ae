"""load_image / image_ref on real image files and bytes written with Pillow."""

from __future__ import annotations

import base64
import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlmcredit.data.images import ImageLoadError, image_ref, load_image
from vlmcredit.errors import VlmCreditError


def _noise(seed: int, size: tuple[int, int] = (24, 16), mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], {"RGB": 3, "RGBA": 4}[mode])
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))  # mode from the shape


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _same_pixels(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and np.array_equal(np.asarray(a), np.asarray(b))


def _assert_one_line_error(exc: pytest.ExceptionInfo[VlmCreditError], *needles: str) -> str:
    message = str(exc.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, (needle, message)
    return message


def test_relative_path_resolves_against_base_dir(tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    original = _noise(0)
    original.save(tmp_path / "imgs" / "a.png")
    img = load_image("imgs/a.png", tmp_path, "data.jsonl row 0 image 0")
    assert img.mode == "RGB"
    assert _same_pixels(img, original)


def test_absolute_path_ignores_base_dir(tmp_path: Path) -> None:
    original = _noise(1)
    target = tmp_path / "abs.png"
    original.save(target)
    img = load_image(str(target), tmp_path / "elsewhere", "x")
    assert _same_pixels(img, original)


def test_path_object_is_accepted(tmp_path: Path) -> None:
    original = _noise(2)
    original.save(tmp_path / "p.png")
    assert _same_pixels(load_image(Path("p.png"), tmp_path, "x"), original)


def test_image_is_fully_loaded_before_return(tmp_path: Path) -> None:
    original = _noise(3)
    target = tmp_path / "gone.png"
    original.save(target)
    img = load_image(target, tmp_path, "x")
    target.unlink()  # pixels must not depend on the file any more
    assert _same_pixels(img, original)


@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview])
def test_raw_bytes(wrap: type, tmp_path: Path) -> None:
    original = _noise(4)
    img = load_image(wrap(_png_bytes(original)), tmp_path, "x")
    assert _same_pixels(img, original)


def test_dict_bytes_win_over_path(tmp_path: Path) -> None:
    original = _noise(5)
    ref = {"bytes": _png_bytes(original), "path": "does-not-exist.png"}
    assert _same_pixels(load_image(ref, tmp_path, "x"), original)


def test_dict_falls_back_to_path(tmp_path: Path) -> None:
    original = _noise(6)
    original.save(tmp_path / "d.png")
    assert _same_pixels(load_image({"bytes": None, "path": "d.png"}, tmp_path, "x"), original)


def test_data_uri(tmp_path: Path) -> None:
    original = _noise(7)
    uri = "data:image/png;base64," + base64.b64encode(_png_bytes(original)).decode()
    assert _same_pixels(load_image(uri, tmp_path, "x"), original)


def test_in_memory_pil_image_is_copied_to_rgb(tmp_path: Path) -> None:
    original = _noise(8)
    img = load_image(original, tmp_path, "x")
    assert img is not original
    assert _same_pixels(img, original)


@pytest.mark.parametrize("mode", ["RGBA", "L", "P"])
def test_other_modes_become_rgb(mode: str, tmp_path: Path) -> None:
    source = _noise(9, mode="RGBA") if mode == "RGBA" else _noise(9).convert(mode)
    source.save(tmp_path / "m.png")
    img = load_image("m.png", tmp_path, "x")
    assert img.mode == "RGB"
    assert _same_pixels(img, source.convert("RGB"))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(VlmCreditError) as exc:
        load_image("nope/missing.png", tmp_path, "rollouts.jsonl row 3 image 0")
    _assert_one_line_error(
        exc, "rollouts.jsonl row 3 image 0", "not found", "missing.png", str(tmp_path), "fix"
    )


def test_directory_is_not_an_image(tmp_path: Path) -> None:
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(VlmCreditError) as exc:
        load_image("dir.png", tmp_path, "rows.jsonl row 1 image 2")
    _assert_one_line_error(exc, "rows.jsonl row 1 image 2", "directory")


def test_empty_path(tmp_path: Path) -> None:
    with pytest.raises(VlmCreditError) as exc:
        load_image("", tmp_path, "row 0 image 0")
    _assert_one_line_error(exc, "row 0 image 0", "empty image path")


def test_truncated_file_fails_on_load(tmp_path: Path) -> None:
    data = _png_bytes(_noise(10, size=(64, 64)))
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    # The header is intact, so only decoding every pixel (img.load()) can notice the damage.
    Image.open(tmp_path / "cut.png").close()
    with pytest.raises(VlmCreditError) as exc:
        load_image("cut.png", tmp_path, "r.jsonl row 5 image 1")
    _assert_one_line_error(exc, "r.jsonl row 5 image 1", "cannot read", "cut.png", "re-encode")


def test_garbage_file(tmp_path: Path) -> None:
    (tmp_path / "junk.jpg").write_bytes(b"this is not an image\n at all")
    with pytest.raises(VlmCreditError) as exc:
        load_image("junk.jpg", tmp_path, "r.jsonl row 0 image 0")
    _assert_one_line_error(exc, "r.jsonl row 0 image 0", "cannot read", "junk.jpg")


def test_garbage_bytes(tmp_path: Path) -> None:
    with pytest.raises(VlmCreditError) as exc:
        load_image(b"\x00\x01garbage", tmp_path, "p.parquet row 2 image 0")
    _assert_one_line_error(exc, "p.parquet row 2 image 0", "image bytes", "sha1:")


def test_bad_base64_data_uri(tmp_path: Path) -> None:
    with pytest.raises(VlmCreditError) as exc:
        load_image("data:image/png;base64,@@@not-base64@@@", tmp_path, "w")
    _assert_one_line_error(exc, "w: ", "base64")


@pytest.mark.parametrize("ref", [42, None, ["a.png"], 1.5])
def test_unsupported_ref_type(ref: object, tmp_path: Path) -> None:
    with pytest.raises(VlmCreditError) as exc:
        load_image(ref, tmp_path, "f.jsonl row 1 image 0")
    _assert_one_line_error(
        exc, "f.jsonl row 1 image 0", f"type {type(ref).__name__}", "path string"
    )


def test_dict_without_bytes_or_path(tmp_path: Path) -> None:
    with pytest.raises(VlmCreditError) as exc:
        load_image({"bytes": None, "path": None}, tmp_path, "v.parquet row 0 image 1")
    _assert_one_line_error(exc, "v.parquet row 0 image 1", "neither 'bytes' nor 'path'")


def test_dict_with_non_bytes_bytes(tmp_path: Path) -> None:
    with pytest.raises(VlmCreditError) as exc:
        load_image({"bytes": "iVBOR...", "path": None}, tmp_path, "x")
    _assert_one_line_error(exc, "'bytes' holds str")


def test_error_keeps_parts_apart(tmp_path: Path) -> None:
    with pytest.raises(ImageLoadError) as exc:
        load_image("missing.png", tmp_path, "w")
    assert exc.value.what == "w"
    assert exc.value.problem.startswith("image file not found")
    assert str(exc.value) == f"w: {exc.value.problem}; {exc.value.hint}"


def test_image_ref_records() -> None:
    data = b"\x89PNG fake"
    digest = hashlib.sha1(data).hexdigest()[:12]
    assert image_ref("imgs/a.png") == "imgs/a.png"
    assert image_ref(Path("b.png")) == "b.png"
    assert image_ref(data) == f"<bytes sha1:{digest}>"
    assert image_ref({"bytes": data, "path": "x.png"}) == f"<bytes sha1:{digest}>"
    assert image_ref({"bytes": None, "path": "x.png"}) == "x.png"
    assert image_ref("data:image/png;base64,AAAA").startswith("<data-uri sha1:")
