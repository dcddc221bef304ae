"""anchors.parquet / anchors.json and an anchors run's per-sample tensors: writer and readers."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from vlmcredit.errors import VlmCreditError
from vlmcredit.formats.anchors import (
    COLUMNS,
    read_anchor_tokens,
    read_anchors,
    read_anchors_summary,
    read_sample_images,
    write_anchors,
)
from vlmcredit.formats.run import Run, read_manifest


def tokens(n: int = 4) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "sample_id": "s0",
            "token_index": np.arange(n, dtype=np.int32),
            "token_id": np.arange(n, dtype=np.int64) + 100,
            "token": [f" t{i}" for i in range(n)],
            "connectivity": np.linspace(0.1, 0.4, n, dtype=np.float32),
            "cluster": np.array([1, 1, 0, 0][:n], np.int32),
            "anchor": np.array([False, False, True, True][:n]),
            "weight": np.array([0, 0, 1, 1][:n], np.float32),
            "threshold_anchor": np.array([False, False, False, True][:n]),
        }
    )


SUMMARY = {
    "ratio_target": 0.15,
    "ratio_achieved": 0.5,
    "connectivity": {"histogram": {"edges": [0.0, 0.2, 0.4], "counts": [2, 2]}, "cut": 0.3},
}


def test_round_trip_and_column_contract(tmp_path) -> None:
    write_anchors(tmp_path, tokens(), SUMMARY)
    got = read_anchors(tmp_path)
    pd.testing.assert_frame_equal(got.tokens, tokens())
    assert got.summary == SUMMARY
    assert tuple(got.tokens.columns) == COLUMNS
    subset = read_anchor_tokens(tmp_path, columns=("sample_id", "token_id"))
    assert list(subset.columns) == ["sample_id", "token_id"]
    with pytest.raises(ValueError, match="columns"):
        write_anchors(tmp_path / "never", tokens().drop(columns="weight"), SUMMARY)
    assert not (tmp_path / "never").exists()


def test_reader_errors_name_the_file_and_the_problem(tmp_path) -> None:
    with pytest.raises(VlmCreditError, match=r"missing anchors\.parquet"):
        read_anchors(tmp_path)
    tokens().drop(columns=["connectivity", "token_id"]).to_parquet(tmp_path / "anchors.parquet")
    with pytest.raises(VlmCreditError, match=r"anchors.parquet: missing column\(s\) connectivity"):
        read_anchor_tokens(tmp_path)
    with pytest.raises(VlmCreditError, match=r"missing column\(s\) token_id"):
        read_anchor_tokens(tmp_path, columns=("sample_id", "token_id"))
    (tmp_path / "anchors.parquet").write_bytes(b"not parquet")
    with pytest.raises(VlmCreditError, match="unreadable parquet"):
        read_anchor_tokens(tmp_path)
    file = tmp_path / "anchors.json"
    for obj, fragment in [
        ("{", "not valid JSON"),
        ([], "expected a JSON object"),
        ({"ratio_achieved": 0.1}, "missing key 'ratio_target'"),
        ({"ratio_target": "x", "ratio_achieved": 0.1}, "'ratio_target' is not a number"),
        (
            {**SUMMARY, "connectivity": {"histogram": {"edges": [0, 1], "counts": [1, 1]}}},
            "2 edges for 2 counts",
        ),
    ]:
        file.write_text(obj if isinstance(obj, str) else json.dumps(obj))
        with pytest.raises(VlmCreditError, match=fragment) as info:
            read_anchors_summary(tmp_path)
        assert str(file) in str(info.value) and "\n" not in str(info.value)


def test_sample_images_from_the_run_shards(tmp_path) -> None:
    run = Run.open(tmp_path / "run", "anchors", {}, resume=False)
    boxes = torch.tensor([[0, 0, 10, 10], [10, 0, 20, 10], [0, 0, 5, 5]], dtype=torch.float32)
    tensors = {
        "s0/attention": torch.rand(4, 3),
        "s0/image_boxes": boxes,
        "s0/image_owner": torch.tensor([0, 0, 1]),
        "s0/thumb.0": torch.zeros(5, 10, 3, dtype=torch.uint8),
        "s0/thumb_scale.0": torch.tensor(0.5),
        "s0/thumb.1": torch.zeros(4, 4, 3, dtype=torch.uint8),  # no scale: from the boxes
    }
    run.commit([{"id": "s0", "status": "done"}, {"id": "s1", "status": "bad"}], tensors)
    run.finish()
    loaded = Run.load(run.path)
    images = read_sample_images(loaded, "s0", 4)
    assert images.attention.shape == (4, 3) and images.owner.tolist() == [0, 0, 1]
    assert images.thumbs[0][1] == 0.5 and images.thumbs[1][1] == pytest.approx(4 / 5)
    assert read_sample_images(loaded, "s1", 0) is None  # a bad row stores nothing
    assert type(loaded.tensors("s0", framework="np")["attention"]).__module__ == "numpy"
    with pytest.raises(VlmCreditError, match=r"expected \(5, N\)"):
        read_sample_images(loaded, "s0", 5)
    (run.path / "shard-00000.safetensors").unlink()
    with pytest.raises(VlmCreditError, match=r"missing shard-00000.safetensors \(sample 's0'\)"):
        read_sample_images(loaded, "s0", 4)


def test_manifest_reader(tmp_path) -> None:
    with pytest.raises(VlmCreditError, match=r"not a run folder \(no manifest.json\)"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(VlmCreditError, match=r"manifest\.json: unreadable"):
        Run.load(tmp_path)
    (tmp_path / "manifest.json").write_text("[1]")
    with pytest.raises(VlmCreditError, match="not a JSON object"):
        read_manifest(tmp_path)
