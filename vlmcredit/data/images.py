"""Image loading for the readers: path strings, raw bytes, or {"bytes", "path"} structs.

Every image is decoded here, fully and at once, so a corrupt file fails while the reader still
knows which row it came from, not later inside the processor.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
import re
import warnings
from pathlib import Path
from typing import Any

from PIL import Image

from vlmcredit.errors import VlmCreditError

_DATA_URI = re.compile(r"data:image/[\w.+-]+;base64,", re.IGNORECASE)
_BYTES_TYPES = (bytes, bytearray, memoryview)
_HINT_READ = "replace the image or re-encode it as PNG/JPEG"
_HINT_REF = "give a path string, image bytes, or a {'bytes': ..., 'path': ...} dict"

# Size limits, checked from the header before any pixel is decoded. Above MAX_PIXELS (PIL's own
# decompression-bomb limit, about 9,459 px squared, 0.27 GB as RGB) decoding could exhaust memory
# long before the processor shrinks the image to its max_pixels, so the image is refused.
# Below MIN_SIDE there is no picture to look at (the processor would blow a 1 x 1 image up to
# 56 x 56 copies of one colour); beyond MAX_ASPECT the Qwen processors raise deep inside.
MAX_PIXELS = 89_478_485
MIN_SIDE = 4
MAX_ASPECT = 200


class ImageLoadError(VlmCreditError):
    """An image reference that cannot be turned into a picture.

    The parts stay apart so a reader can re-word the problem under its own row label instead of
    repeating the input's name.
    """

    def __init__(self, what: str, problem: str, hint: str) -> None:
        self.what = what
        self.problem = _one_line(problem)
        self.hint = hint
        super().__init__(f"{what}: {self.problem}" + (f"; {hint}" if hint else ""))


def load_image(ref: Any, base_dir: Path, what: str) -> Image.Image:
    """Load one image reference as a fully decoded RGB image.

    `ref` is a path (relative paths resolve against `base_dir`, the data file's folder), raw
    bytes, a `data:image/...;base64,` URI, a PIL image, or a dict {"bytes": ..., "path": ...}
    as HF datasets and VERL store images (bytes win when present). `what` names the input in
    error messages, e.g. "rollouts.jsonl row 3 image 0".
    """
    if isinstance(ref, dict):
        return _load_dict(ref, base_dir, what)
    if isinstance(ref, _BYTES_TYPES):
        data = bytes(ref)
        return _decode(io.BytesIO(data), f"image bytes ({_bytes_ref(data)})", what)
    if isinstance(ref, str) and _DATA_URI.match(ref):
        return _decode(io.BytesIO(_data_uri_bytes(ref, what)), "data URI image", what)
    if isinstance(ref, (str, os.PathLike)):
        path = _resolve(ref, base_dir, what)
        return _decode(path, str(path), what)
    if isinstance(ref, Image.Image):
        return _decode_pil(ref, "in-memory image", what)
    problem = f"unsupported image reference of type {type(ref).__name__}"
    raise ImageLoadError(what, problem, _HINT_REF)


def image_ref(ref: Any) -> str:
    """A short, JSON-friendly record of where an image came from (paths kept as given)."""
    if isinstance(ref, dict):
        data = ref.get("bytes")
        return image_ref(data if data is not None else ref.get("path"))
    if isinstance(ref, _BYTES_TYPES):
        return _bytes_ref(bytes(ref))
    if isinstance(ref, str) and _DATA_URI.match(ref):
        # The URI itself can be megabytes long; a digest identifies it just as well.
        return f"<data-uri sha1:{hashlib.sha1(ref.encode()).hexdigest()[:12]}>"
    if isinstance(ref, (str, os.PathLike)):
        return os.fspath(ref)
    if isinstance(ref, Image.Image):
        return "<in-memory image>"
    return f"<{type(ref).__name__}>"


def _load_dict(ref: dict[str, Any], base_dir: Path, what: str) -> Image.Image:
    data, path = ref.get("bytes"), ref.get("path")
    if data is not None:
        if not isinstance(data, _BYTES_TYPES):
            problem = f"image dict 'bytes' holds {type(data).__name__}, not bytes"
            raise ImageLoadError(what, problem, _HINT_REF)
        return load_image(bytes(data), base_dir, what)
    if path is not None:
        return load_image(path, base_dir, what)
    raise ImageLoadError(what, "image dict has neither 'bytes' nor 'path'", _HINT_REF)


def _resolve(ref: str | os.PathLike[str], base_dir: Path, what: str) -> Path:
    if not os.fspath(ref):
        raise ImageLoadError(what, "empty image path", "give the image's file path")
    given = Path(ref).expanduser()
    path = given if given.is_absolute() else Path(base_dir) / given
    if path.is_file():
        return path
    if path.is_dir():
        raise ImageLoadError(what, f"{path} is a directory, not an image file", "fix the path")
    where = "" if given.is_absolute() else f" (relative paths resolve against {base_dir})"
    raise ImageLoadError(what, f"image file not found: {_short(str(path))}{where}", "fix the path")


_DOWNSCALE = "downscale it first (the model sees at most its processor's max_pixels anyway)"


def size_problem(width: int, height: int) -> str | None:
    """Why an image of this size is refused, with what to do (see MAX_PIXELS), or None."""
    if width * height > MAX_PIXELS:
        return (
            f"{width} x {height} px ({width * height / 1e6:.0f} Mpx) is over the "
            f"{MAX_PIXELS / 1e6:.0f} Mpx limit (decompression-bomb guard): {_DOWNSCALE}"
        )
    if min(width, height) < MIN_SIDE:
        return (
            f"{width} x {height} px is smaller than {MIN_SIDE} px on a side, no picture to "
            "look at: use the original image"
        )
    if max(width, height) > MAX_ASPECT * min(width, height):
        return (
            f"{width} x {height} px has an aspect ratio over {MAX_ASPECT}:1, which the Qwen-VL "
            "processors refuse: crop or pad it"
        )
    return None


def _decode(source: Path | io.BytesIO, desc: str, what: str) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # PIL warns between 1x and 2x its limit and raises above; size_problem refuses both
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                return _decode_pil(img, desc, what)
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as exc:
        pixels = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{int(pixels.group(1)) / 1e6:.0f} Mpx" if pixels else "too many pixels"
        problem = f"{size} is over the {MAX_PIXELS / 1e6:.0f} Mpx limit (decompression-bomb guard)"
        raise ImageLoadError(what, f"{_short(desc)}: {problem}: {_DOWNSCALE}", "") from None
    # PIL reports bad data through many types (OSError, SyntaxError, struct.error, ...), and
    # every one of them means the same thing here: this input is not a readable image.
    except Exception as exc:
        raise ImageLoadError(what, _read_problem(desc, exc), _HINT_READ) from exc


def _decode_pil(img: Image.Image, desc: str, what: str) -> Image.Image:
    refused = size_problem(*img.size)
    if refused is not None:
        raise ImageLoadError(what, f"{_short(desc)}: {refused}", "")
    try:
        img.load()  # decode every pixel now: truncated or corrupt data must fail here
        # convert() always copies, so the result never depends on the (soon closed) file.
        return img.convert("RGB")
    except Exception as exc:  # see _decode: any decoder failure is a bad input
        raise ImageLoadError(what, _read_problem(desc, exc), _HINT_READ) from exc


def _read_problem(desc: str, exc: Exception) -> str:
    return f"cannot read {_short(desc)} as an image ({type(exc).__name__}: {exc})"


def _data_uri_bytes(uri: str, what: str) -> bytes:
    payload = uri[uri.index(",") + 1 :]
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageLoadError(what, f"invalid base64 in data URI ({exc})", _HINT_READ) from exc


def _bytes_ref(data: bytes) -> str:
    return f"<bytes sha1:{hashlib.sha1(data).hexdigest()[:12]}>"


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _one_line(text: str) -> str:
    return re.sub(r"\s*\n\s*", " ", text).strip()
