"""Rollout readers on real JSONL, parquet and VERL-style parquet files with real PNG images."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vlmcredit.data.rollouts import (
    BadRow,
    RolloutKeys,
    RolloutSet,
    detect_format,
    iter_rollouts,
    read_rollouts,
    split_image_placeholders,
)
from vlmcredit.data.sample import Sample
from vlmcredit.errors import VlmCreditError

IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
PART_STRUCT = pa.struct([("type", pa.string()), ("text", pa.string())])
PROCESSOR_MESSAGE = pa.struct([("role", pa.string()), ("content", pa.list_(PART_STRUCT))])
VERL_MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])


# --- helpers ------------------------------------------------------------------------------


def _noise(seed: int, size: tuple[int, int] = (20, 12)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _save(img: Image.Image, path: Path) -> Image.Image:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return img


def _write_jsonl(path: Path, rows: list[Any]) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def _same_pixels(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and np.array_equal(np.asarray(a), np.asarray(b))


def _all_same(got: list[Image.Image], expected: list[Image.Image]) -> bool:
    return len(got) == len(expected) and all(map(_same_pixels, got, expected))


def _sha(data: bytes) -> str:
    return f"<bytes sha1:{hashlib.sha1(data).hexdigest()[:12]}>"


def _row(i: int, **fields: Any) -> dict[str, Any]:
    """A valid text-prompt JSONL row with image `img{i}.png`, overridable per field."""
    row: dict[str, Any] = {
        "id": f"s{i}",
        "images": [f"img{i}.png"],
        "prompt": f"question {i}",
        "response": f"answer {i}",
    }
    row.update(fields)
    return {k: v for k, v in row.items() if v is not _DROP}


_DROP = object()  # marks a field to leave out of a row


def _images_for(tmp_path: Path, n: int) -> list[Image.Image]:
    return [_save(_noise(100 + i), tmp_path / f"img{i}.png") for i in range(n)]


def _error(path: Path, **kwargs: Any) -> str:
    with pytest.raises(VlmCreditError) as exc:
        read_rollouts(path, **kwargs)
    message = str(exc.value)
    assert "\n" not in message
    assert path.name in message
    return message


def _row_error(path: Path, row: int, *needles: str) -> str:
    message = _error(path)
    assert f"row {row}" in message
    assert "--skip-bad" in message
    for needle in needles:
        assert needle in message, (needle, message)
    return message


# --- JSONL --------------------------------------------------------------------------------


def test_jsonl_round_trip(tmp_path: Path) -> None:
    a = _save(_noise(1), tmp_path / "imgs" / "a.png")
    b = _save(_noise(2), tmp_path / "b.png")
    outside = _save(_noise(3), tmp_path / "other" / "c.png")
    messages = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Same?"}],
        }
    ]
    path = _write_jsonl(
        tmp_path / "rollouts.jsonl",
        [
            {"id": "x1", "images": ["imgs/a.png"], "prompt": "What is it?", "response": "A cat."},
            {
                "id": 7,
                "images": ["b.png", str(tmp_path / "other" / "c.png")],
                "messages": messages,
                "response": [11, 12, 13],
                "reward": 0.5,
            },
        ],
    )
    result = read_rollouts(path)
    assert isinstance(result, RolloutSet)
    assert (result.format, result.path, result.bad_rows, len(result)) == ("jsonl", path, [], 2)
    first, second = result.samples
    assert isinstance(first, Sample)
    assert (first.id, first.prompt, first.response) == ("x1", "What is it?", "A cat.")
    assert len(first.images) == 1 and _same_pixels(first.images[0], a)
    assert first.meta["row"] == 0 and first.meta["line"] == 1
    assert first.meta["image_refs"] == ["imgs/a.png"]
    assert (second.id, second.prompt, second.response) == ("7", messages, [11, 12, 13])
    assert _all_same(second.images, [b, outside])
    assert all(img.mode == "RGB" for img in second.images)
    assert second.meta["image_refs"] == ["b.png", str(tmp_path / "other" / "c.png")]
    assert second.meta["extra"] == {} and second.meta["reward"] == 0.5


def test_relative_paths_resolve_against_the_data_file_not_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    img = _save(_noise(4), tmp_path / "runs" / "pics" / "p.png")
    _write_jsonl(tmp_path / "runs" / "r.jsonl", [_row(0, images=["pics/p.png"])])
    monkeypatch.chdir(tmp_path)  # cwd differs from the data file's folder
    sample = read_rollouts(Path("runs/r.jsonl")).samples[0]
    assert _same_pixels(sample.images[0], img)
    assert sample.meta["image_refs"] == ["pics/p.png"]


def test_jsonl_blank_lines_ids_and_text_only_rows(tmp_path: Path) -> None:
    _images_for(tmp_path, 1)
    path = tmp_path / "r.jsonl"
    rows = [_row(0, id=_DROP), _row(1, id=_DROP, images=[])]
    path.write_text("\n" + json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n\n")
    result = read_rollouts(path)
    assert [s.id for s in result.samples] == ["row-0", "row-1"]
    assert [s.meta["line"] for s in result.samples] == [2, 4]
    assert result.samples[1].images == []


def test_jsonl_messages_with_placeholder_strings_are_converted(tmp_path: Path) -> None:
    _images_for(tmp_path, 1)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "<image>What colour?"},
    ]
    path = _write_jsonl(tmp_path / "r.jsonl", [_row(0, prompt=_DROP, messages=messages)])
    sample = read_rollouts(path).samples[0]
    assert sample.prompt == [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]},
    ]


def test_require_response_false_fills_empty_response(tmp_path: Path) -> None:
    _images_for(tmp_path, 1)
    path = _write_jsonl(tmp_path / "r.jsonl", [_row(0, response=_DROP)])
    assert read_rollouts(path, require_response=False).samples[0].response == ""
    assert "missing 'response'" in _row_error(path, 0)


# --- parquet (processor format) -----------------------------------------------------------


def test_parquet_messages_with_image_bytes(tmp_path: Path) -> None:
    imgs = [_noise(10), _noise(11), _noise(12)]
    blobs = [_png_bytes(i) for i in imgs]
    content = [
        {"type": "image", "text": None},
        {"type": "text", "text": "Compare."},
        {"type": "image", "text": None},
    ]
    table = pa.table(
        {
            "id": ["a", "b"],
            "images": pa.array(
                [
                    [{"bytes": blobs[0], "path": "orig0.png"}, {"bytes": blobs[1], "path": None}],
                    [{"bytes": blobs[2], "path": "x.png"}],
                ],
                type=pa.list_(IMAGE_STRUCT),
            ),
            "messages": pa.array(
                [
                    [{"role": "user", "content": content}],
                    [{"role": "user", "content": [content[0], content[1]]}],
                ],
                type=pa.list_(PROCESSOR_MESSAGE),
            ),
            "response": ["first", "second"],
        }
    )
    path = tmp_path / "rollouts.parquet"
    pq.write_table(table, path)
    result = read_rollouts(path)
    assert result.format == "parquet"
    assert [s.id for s in result.samples] == ["a", "b"]
    first, second = result.samples
    assert first.prompt == [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "Compare."}, {"type": "image"}],
        }
    ]
    assert _all_same(first.images, imgs[:2])
    assert _same_pixels(second.images[0], imgs[2])
    assert first.meta["image_refs"] == [_sha(blobs[0]), _sha(blobs[1])]
    assert (first.meta["row"], second.meta["row"]) == (0, 1)
    assert second.response == "second"


def test_parquet_text_prompt_with_relative_paths_and_token_ids(tmp_path: Path) -> None:
    img = _save(_noise(13), tmp_path / "pics" / "q.png")
    table = pa.table(
        {
            "id": pa.array([5, 6], type=pa.int64()),
            "images": [["pics/q.png"], []],
            "prompt": ["Describe.", "No image here."],
            "response": pa.array([[1, 2, 3], [4]], type=pa.list_(pa.int64())),
        }
    )
    path = tmp_path / "r.parquet"
    pq.write_table(table, path)
    result = read_rollouts(path)
    assert result.format == "parquet"
    assert [(s.id, s.prompt, s.response) for s in result.samples] == [
        ("5", "Describe.", [1, 2, 3]),
        ("6", "No image here.", [4]),
    ]
    assert _same_pixels(result.samples[0].images[0], img)
    assert result.samples[0].meta["image_refs"] == ["pics/q.png"]


# --- VERL / EasyR1 parquet ----------------------------------------------------------------


def _verl_table(imgs: list[list[bytes]], prompts: list[str], **extra: Any) -> pa.Table:
    columns: dict[str, Any] = {
        "data_source": ["geo"] * len(prompts),
        "prompt": pa.array(
            [[{"role": "user", "content": p}] for p in prompts], type=pa.list_(VERL_MESSAGE)
        ),
        "images": pa.array(
            [[{"bytes": b, "path": None} for b in row] for row in imgs],
            type=pa.list_(IMAGE_STRUCT),
        ),
    }
    columns.update(extra)
    return pa.table(columns)


def test_verl_parquet(tmp_path: Path) -> None:
    imgs = [_noise(20), _noise(21), _noise(22)]
    blobs = [_png_bytes(i) for i in imgs]
    extra_info = pa.array(
        [{"index": 3, "split": "train"}, {"index": 9, "split": "train"}],
        type=pa.struct([("index", pa.int64()), ("split", pa.string())]),
    )
    table = _verl_table(
        [[blobs[0]], [blobs[1], blobs[2]]],
        ["<image>Find x.", "Left <image> right <image>"],
        extra_info=extra_info,
        response=["x = 2", "4"],
    )
    path = tmp_path / "verl.parquet"
    pq.write_table(table, path)
    assert detect_format(path) == "verl"
    result = read_rollouts(path)
    assert result.format == "verl"
    first, second = result.samples
    assert (first.id, second.id) == ("3", "9")
    assert first.prompt == [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Find x."}]}
    ]
    assert second.prompt == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Left "},
                {"type": "image"},
                {"type": "text", "text": " right "},
                {"type": "image"},
            ],
        }
    ]
    assert _all_same(second.images, imgs[1:])
    assert second.response == "4"
    assert second.meta["extra"]["extra_info"] == {"index": 9, "split": "train"}
    assert second.meta["image_refs"] == [_sha(blobs[1]), _sha(blobs[2])]


def test_verl_id_prefers_sample_id_then_index_then_row(tmp_path: Path) -> None:
    blob = _png_bytes(_noise(23))
    extra_info = pa.array(
        [{"index": 1, "sample_id": "geo-1"}, {"index": 2, "sample_id": None}, None],
        type=pa.struct([("index", pa.int64()), ("sample_id", pa.string())]),
    )
    table = _verl_table([[blob]] * 3, ["<image>q"] * 3, extra_info=extra_info, response=["r"] * 3)
    path = tmp_path / "v.parquet"
    pq.write_table(table, path)
    assert [s.id for s in read_rollouts(path).samples] == ["geo-1", "2", "row-2"]


def test_verl_without_response_column(tmp_path: Path) -> None:
    table = _verl_table([[_png_bytes(_noise(24))]], ["<image>q"])
    path = tmp_path / "prompts.parquet"
    pq.write_table(table, path)
    assert read_rollouts(path, require_response=False).samples[0].response == ""
    message = _error(path)
    assert "'response'" in message and "require_response=False" in message


def test_verl_image_count_mismatch(tmp_path: Path) -> None:
    blob = _png_bytes(_noise(25))
    table = _verl_table([[blob], [blob]], ["<image>ok", "<image><image>two"], response=["a", "b"])
    path = tmp_path / "v.parquet"
    pq.write_table(table, path)
    _row_error(path, 1, "2 image parts but 1 images were given")


# --- row errors ---------------------------------------------------------------------------

_MESSAGES_2 = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}]}]

ROW_ERRORS = {
    "missing images": (_row(9, images=_DROP), "missing 'images'"),
    "missing prompt": (_row(9, prompt=_DROP), "missing 'prompt'"),
    "missing response": (_row(9, response=_DROP), "missing 'response'"),
    "images not a list": (_row(9, images="img0.png"), "'images' must be a list"),
    "prompt wrong type": (_row(9, prompt=3), "'prompt' must be text"),
    "response wrong type": (_row(9, response={"text": "a"}), "'response' must be text"),
    "id wrong type": (_row(9, id=["a"]), "id must be text"),
    "messages not a list": (_row(9, prompt=_DROP, messages="hi"), "'messages' must be a list"),
    "message without role": (
        _row(9, prompt=_DROP, messages=[{"content": "hi"}]),
        "messages[0] has no 'role'",
    ),
    "unsupported part": (
        _row(9, prompt=_DROP, messages=[{"role": "user", "content": [{"type": "video"}]}]),
        "unsupported part type 'video'",
    ),
    "image count": (
        _row(9, images=["img0.png"], prompt=_DROP, messages=_MESSAGES_2),
        "messages have 2 image parts but 1 images were given",
    ),
    "missing image file": (_row(9, images=["nowhere.png"]), "image 0: image file not found"),
    "unsupported image ref": (_row(9, images=[12]), "image 0: unsupported image reference"),
    "invalid json": ('{"id": "s9", "images": [', "invalid JSON"),
    "not an object": ("[1, 2, 3]", "expected a JSON object, got list"),
}


@pytest.mark.parametrize("bad", ROW_ERRORS.values(), ids=ROW_ERRORS.keys())
def test_row_errors_name_file_and_row(bad: tuple[Any, str], tmp_path: Path) -> None:
    _images_for(tmp_path, 4)
    row, needle = bad
    path = _write_jsonl(tmp_path / "rollouts.jsonl", [_row(0), _row(1), _row(2), row, _row(3)])
    message = _row_error(path, 3, needle, "line 4")
    assert message.startswith(str(path))


def test_corrupt_image_is_a_row_error(tmp_path: Path) -> None:
    _images_for(tmp_path, 1)
    data = _png_bytes(_noise(30, size=(64, 64)))
    (tmp_path / "broken.png").write_bytes(data[: len(data) // 2])
    path = _write_jsonl(tmp_path / "r.jsonl", [_row(0), _row(1, images=["img0.png", "broken.png"])])
    _row_error(path, 1, "image 1", "cannot read", "broken.png")


def test_duplicate_id(tmp_path: Path) -> None:
    # the same id and the same response: nothing tells the two rows apart
    _images_for(tmp_path, 3)
    rows = [_row(0), _row(1), _row(2, id="abc"), _row(0, id="zz"), _row(1, id="abc")]
    rows[4]["response"] = rows[2]["response"]
    path = _write_jsonl(tmp_path / "r.jsonl", rows)
    _row_error(path, 4, "duplicate id 'abc' (first seen at row 2) with the same response")


def test_skip_bad_records_bad_rows(tmp_path: Path) -> None:
    _images_for(tmp_path, 3)
    rows = [
        _row(0),
        "{not json",
        _row(0, id="s0"),  # duplicate of row 0 (same id, same response)
        _row(2, images=["nowhere.png"]),
        _row(2),
    ]
    path = _write_jsonl(tmp_path / "r.jsonl", rows)
    result = read_rollouts(path, skip_bad=True)
    assert [s.id for s in result.samples] == ["s0", "s2"]
    assert [s.meta["row"] for s in result.samples] == [0, 4]
    assert [(b.row, b.id) for b in result.bad_rows] == [(1, None), (2, "s0"), (3, "s2")]
    assert all(isinstance(b, BadRow) and "\n" not in b.error for b in result.bad_rows)
    assert result.bad_rows[0].error.startswith("row 1 (line 2): invalid JSON")
    assert result.bad_rows[1].error.startswith(
        "row 2 (line 3): duplicate id 's0' (first seen at row 0) with the same response"
    )
    assert "nowhere.png" in result.bad_rows[2].error


def test_skipped_row_does_not_claim_its_id(tmp_path: Path) -> None:
    _images_for(tmp_path, 1)
    rows = [_row(0, id="a", images=["nowhere.png"]), _row(0, id="a")]
    path = _write_jsonl(tmp_path / "r.jsonl", rows)
    result = read_rollouts(path, skip_bad=True)
    assert [s.id for s in result.samples] == ["a"]
    assert [b.row for b in result.bad_rows] == [0]


def test_skip_bad_on_parquet(tmp_path: Path) -> None:
    blob = _png_bytes(_noise(31))
    table = _verl_table([[blob], [blob]], ["<image>a", "no image part"], response=["x", "y"])
    path = tmp_path / "v.parquet"
    pq.write_table(table, path)
    result = read_rollouts(path, skip_bad=True)
    assert [s.id for s in result.samples] == ["row-0"]
    assert result.bad_rows == [
        BadRow(1, None, "row 1: prompt messages have 0 image parts but 1 images were given")
    ]


# --- max_samples and lazy reading ---------------------------------------------------------


def test_max_samples_stops_before_later_bad_rows(tmp_path: Path) -> None:
    _images_for(tmp_path, 3)
    path = _write_jsonl(tmp_path / "r.jsonl", [_row(0), _row(1), "{broken", _row(2)])
    assert [s.id for s in read_rollouts(path, max_samples=2).samples] == ["s0", "s1"]
    assert read_rollouts(path, max_samples=0).samples == []
    result = read_rollouts(path, max_samples=3, skip_bad=True)
    assert [s.id for s in result.samples] == ["s0", "s1", "s2"]
    assert [b.row for b in result.bad_rows] == [2]


def test_max_samples_negative(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "r.jsonl", [_row(0)])
    with pytest.raises(VlmCreditError, match="max_samples"):
        read_rollouts(path, max_samples=-1)


def test_iter_rollouts_is_lazy_and_collects_bad_rows(tmp_path: Path) -> None:
    _images_for(tmp_path, 2)
    path = _write_jsonl(tmp_path / "r.jsonl", [_row(0), "{bad", _row(1)])
    bad: list[BadRow] = []
    samples = iter_rollouts(path, skip_bad=True, bad_rows=bad)
    first = next(samples)
    assert first.id == "s0" and bad == []
    assert [s.id for s in samples] == ["s1"]
    assert [b.row for b in bad] == [1]
    strict = iter_rollouts(path)
    assert next(strict).id == "s0"
    with pytest.raises(VlmCreditError, match="row 1"):
        next(strict)


def test_iter_rollouts_fails_early_on_file_errors(tmp_path: Path) -> None:
    with pytest.raises(VlmCreditError, match="not found"):
        iter_rollouts(tmp_path / "missing.jsonl")  # raises before any next()


# --- file-level errors --------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    assert "not found" in _error(tmp_path / "absent.jsonl")


def test_directory(tmp_path: Path) -> None:
    (tmp_path / "dir.parquet").mkdir()
    assert "directory" in _error(tmp_path / "dir.parquet")


def test_unknown_extension(tmp_path: Path) -> None:
    path = tmp_path / "rollouts.csv"
    path.write_text("id,prompt\n")
    message = _error(path)
    assert "'.csv'" in message and ".jsonl" in message and ".parquet" in message


def test_json_array_file(tmp_path: Path) -> None:
    path = tmp_path / "rollouts.json"
    path.write_text(json.dumps([_row(0)]))
    assert "one JSON object per line" in _error(path)


def test_json_lines_in_dot_json_file(tmp_path: Path) -> None:
    _images_for(tmp_path, 1)
    path = _write_jsonl(tmp_path / "rollouts.json", [_row(0)])
    assert [s.id for s in read_rollouts(path).samples] == ["s0"]


def test_unreadable_parquet(tmp_path: Path) -> None:
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"definitely not parquet")
    assert "cannot read as parquet" in _error(path)


def test_truncated_parquet(tmp_path: Path) -> None:
    path = tmp_path / "cut.parquet"
    pq.write_table(
        pa.table({"id": ["a"], "images": [[]], "prompt": ["p"], "response": ["r"]}), path
    )
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert "cannot read" in _error(path)


def test_parquet_missing_columns(tmp_path: Path) -> None:
    path = tmp_path / "cols.parquet"
    pq.write_table(pa.table({"id": ["a"], "response": ["r"]}), path)
    message = _error(path, skip_bad=True)  # skipping rows cannot fix a missing column
    assert "'images'" in message and "'prompt' or 'messages'" in message
    assert "columns: id, response" in message


# --- placeholder splitting ----------------------------------------------------------------


def test_split_image_placeholders() -> None:
    assert split_image_placeholders("<image>a<image><image>b") == [
        {"type": "image"},
        {"type": "text", "text": "a"},
        {"type": "image"},
        {"type": "image"},
        {"type": "text", "text": "b"},
    ]
    assert split_image_placeholders("plain") == [{"type": "text", "text": "plain"}]
    assert split_image_placeholders("") == []


# --- trainer rollouts: groups, token ids, column keys -------------------------------------


def _trainer_row(i: int, **fields: Any) -> dict[str, Any]:
    row = _row(0, id="g", completion_index=i, response_ids=[10 + i, 11, 2], response=_DROP)
    row.update(fields)
    return row


def test_group_rows_get_unique_run_ids_and_keep_the_trainer_id(tmp_path: Path) -> None:
    _images_for(tmp_path, 1)
    rows = [_trainer_row(k, reward=0.5 * k, advantage=-1.0 + k) for k in (2, 0, 1)]
    rows[0]["response"] = "the text beside the ids"
    result = read_rollouts(_write_jsonl(tmp_path / "g.jsonl", rows))
    samples = result.samples
    assert [s.id for s in samples] == ["g#2", "g#0", "g#1"]
    assert [(s.sample_id, s.trainer_id, s.completion_index) for s in samples] == [
        ("g", "g", 2),
        ("g", "g", 0),
        ("g", "g", 1),
    ]
    assert [s.response for s in samples] == [[12, 11, 2], [10, 11, 2], [11, 11, 2]]
    assert samples[0].meta["response_text"] == "the text beside the ids"
    assert [(s.meta["reward"], s.meta["advantage"]) for s in samples] == [
        (1.0, 1.0),
        (0.0, -1.0),
        (0.5, 0.0),
    ]
    assert all(s.meta["extra"] == {} for s in samples)


def test_duplicate_completion_index_and_taken_run_ids(tmp_path: Path) -> None:
    _images_for(tmp_path, 1)
    path = _write_jsonl(tmp_path / "d.jsonl", [_trainer_row(0), _trainer_row(1), _trainer_row(0)])
    _row_error(path, 2, "duplicate id 'g' with completion_index 0 (first seen at row 0)")
    # without an index the second row of 'g' would be 'g#1', which row 0 already holds
    rows = [_trainer_row(1), _row(0, id="g", response="x"), _row(0, id="g", response="y")]
    path = _write_jsonl(tmp_path / "t.jsonl", rows)
    _row_error(path, 2, "run id 'g#1' is already the id of row 0")


TRAINER_ROW_ERRORS = {
    "missing id": ({"id": _DROP}, "missing 'id'"),
    "ids not a list": ({"response_ids": "1 2 3"}, "'response_ids' must be a list of token ids"),
    "ids empty": ({"response_ids": []}, "'response_ids' is empty"),
    "negative id": ({"response_ids": [4, -1]}, "'response_ids'[1] must be a token id"),
    "float id": ({"response_ids": [4, 2.5]}, "'response_ids'[1] must be a token id"),
    "bool id": ({"response_ids": [True]}, "'response_ids'[0] must be a token id"),
    "text id": ({"response_ids": ["7"]}, "'response_ids'[0] must be a token id"),
    "bad prompt ids": ({"prompt_ids": [1, None]}, "'prompt_ids'[1] must be a token id"),
    "negative index": ({"completion_index": -1}, "'completion_index' must be an integer >= 0"),
    "bool index": ({"completion_index": True}, "'completion_index' must be an integer >= 0"),
    "reward text": ({"reward": "high"}, "'reward' must be a finite number"),
}


@pytest.mark.parametrize("bad", TRAINER_ROW_ERRORS.values(), ids=TRAINER_ROW_ERRORS.keys())
def test_malformed_trainer_rows_name_the_row(bad: tuple[dict[str, Any], str], tmp_path: Path):
    _images_for(tmp_path, 1)
    fields, needle = bad
    bad_row = _trainer_row(2)
    for key, value in fields.items():
        if value is _DROP:
            bad_row.pop(key)
        else:
            bad_row[key] = value
    path = _write_jsonl(tmp_path / "r.jsonl", [_trainer_row(0), _trainer_row(1), bad_row])
    _row_error(path, 2, needle, "line 3")
    result = read_rollouts(path, skip_bad=True)
    assert [s.id for s in result.samples] == ["g#0", "g#1"]
    assert [b.row for b in result.bad_rows] == [2]


@pytest.mark.parametrize("seed", range(8))
def test_random_token_id_lists(seed: int, tmp_path: Path) -> None:
    """Property: a list of ints >= 0 reads back exactly; any other element is a one-line error
    naming the row and the position of the first bad element."""
    _images_for(tmp_path, 1)
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 200_000, size=int(rng.integers(1, 40))).tolist()
    good = read_rollouts(_write_jsonl(tmp_path / "ok.jsonl", [_trainer_row(0, response_ids=ids)]))
    assert good.samples[0].response == ids
    spoiled = list(ids)
    at = int(rng.integers(0, len(ids)))
    spoiled[at] = [-int(rng.integers(1, 10**6)), 0.5, "x", None, [1]][seed % 5]
    path = _write_jsonl(tmp_path / "bad.jsonl", [_trainer_row(0, response_ids=spoiled)])
    _row_error(path, 0, f"'response_ids'[{at}] must be a token id")


def test_easyr1_string_prompt_splits_on_image_placeholders(tmp_path: Path) -> None:
    imgs = _images_for(tmp_path, 2)
    rows = [
        {"problem": "A <image> then <image>.", "images": ["img0.png", "img1.png"], "response": "r"},
        {"problem": "No image here.", "images": [], "response": "s"},
        {"problem": "<image><image> two", "images": ["img0.png"], "response": "t"},
    ]
    path = _write_jsonl(tmp_path / "e.jsonl", rows)
    keys = RolloutKeys(prompt="problem")
    message = _error(path, keys=keys)
    assert "row 2" in message
    assert "'problem' text has 2 <image> placeholders but 1 images were given" in message
    first, second = read_rollouts(path, keys=keys, max_samples=2).samples
    assert first.prompt == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "A "},
                {"type": "image"},
                {"type": "text", "text": " then "},
                {"type": "image"},
                {"type": "text", "text": "."},
            ],
        }
    ]
    assert _all_same(first.images, imgs)
    assert second.prompt == "No image here."


def test_image_and_response_keys(tmp_path: Path) -> None:
    _images_for(tmp_path, 1)
    row = {"id": "a", "pics": ["img0.png"], "question": "Q?", "completion": "yes"}
    path = _write_jsonl(tmp_path / "k.jsonl", [row])
    keys = RolloutKeys(prompt="question", images="pics", response="completion")
    sample = read_rollouts(path, keys=keys).samples[0]
    assert (sample.prompt, sample.response, len(sample.images)) == ("Q?", "yes", 1)
    assert sample.meta["extra"] == {}
    pq.write_table(
        pa.table({"id": ["a"], "pics": [["img0.png"]], "question": ["Q?"]}),
        p := tmp_path / "k.parquet",
    )
    message = _error(p)
    assert "no 'images'" in message and "--prompt-key/--image-key/--response-key" in message
