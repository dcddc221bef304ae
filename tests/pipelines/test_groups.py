"""GRPO groups and trainer token ids through `capture`, `anchors` and `weights` on a real tiny
checkpoint and real files: exact response ids (EOS included, never re-tokenised), signals keyed
(trainer id, sha1 of the ids), prompt_ids checked or used, EasyR1 and VERL prompt building."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from tests.helpers import noise_image
from vlmcredit.cli.main import app
from vlmcredit.data.rollouts import RolloutKeys, read_rollouts
from vlmcredit.errors import VlmCreditError
from vlmcredit.formats.run import Run
from vlmcredit.formats.signals import read_signals, response_id
from vlmcredit.models.inputs import encode_samples
from vlmcredit.pipelines.anchors import AnchorsRunConfig, run_anchors
from vlmcredit.pipelines.capture import CaptureRunConfig, run_capture
from vlmcredit.pipelines.weights import WeightsRunConfig, run_weights

FAMILY = "qwen2.5-vl"
WORDS = ["redsquare", "bluecircle", "noise", "dots"]
runner = CliRunner()


def _char_ids(tok: Any, word: str) -> list[int]:
    """One token per character: ids a sampler can produce but the tokenizer never gives."""
    ids = [tok.convert_tokens_to_ids(ch) for ch in word]
    assert tok.unk_token_id not in ids
    return ids


def _eos(tok: Any) -> int:
    return int(tok.convert_tokens_to_ids("<|im_end|>"))


def _group_rows(tmp_path: Path, tok: Any, prompts: int = 2, size: int = 4) -> list[dict]:
    rows = []
    for p in range(prompts):
        noise_image(56 + 28 * p, 84, seed=p).save(tmp_path / f"img{p}.png")
        for k in range(size):
            rows.append(
                {
                    "id": f"p{p}",
                    "completion_index": k,
                    "images": [f"img{p}.png"],
                    "prompt": f"Describe picture {p}.",
                    "response_ids": [*_char_ids(tok, WORDS[k]), _eos(tok)],
                    "reward": float(k),
                    "advantage": k - 1.5,
                }
            )
    return rows


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_group_of_four_survives_capture_anchors_and_weights(tmp_path: Path, loaded, tiny_ckpt):
    tok = loaded(FAMILY).processor.tokenizer
    rows = _group_rows(tmp_path, tok)
    for r in rows:  # the ids are not what tokenising their text gives: no re-tokenisation
        assert (
            tok(tok.decode(r["response_ids"]), add_special_tokens=False)["input_ids"]
            != (r["response_ids"])
        )
    data = _write_jsonl(tmp_path / "groups.jsonl", rows)
    ckpt = str(tiny_ckpt(FAMILY))
    expected = {
        ("p0" if i < 4 else "p1", response_id(r["response_ids"])) for i, r in enumerate(rows)
    }
    assert len(expected) == 8

    cap = run_capture(
        CaptureRunConfig(ckpt=ckpt, data=data, out=tmp_path / "cap", batch_size=3, qk=False)
    )
    table = pd.read_parquet(tmp_path / "cap" / "samples.parquet")
    assert table["id"].tolist() == [f"p{p}#{k}" for p in range(2) for k in range(4)]
    assert table["sample_id"].tolist() == ["p0"] * 4 + ["p1"] * 4
    assert table["completion_index"].tolist() == [0, 1, 2, 3] * 2
    for r, run_id in zip(rows, table["id"], strict=True):
        assert cap.tensors(run_id)["response_ids"].tolist() == r["response_ids"]
    assert Run.load(tmp_path / "cap").rows[5]["completion_index"] == 1

    run_anchors(AnchorsRunConfig(out=tmp_path / "anc", ckpt=ckpt, data=data, batch_size=3))
    run_weights(
        WeightsRunConfig(out=tmp_path / "w", ckpt=ckpt, data=data, method="anchors", batch_size=3)
    )
    for folder in ("anc", "w"):
        signals = read_signals(tmp_path / folder)
        frame = signals.frame
        keys = set(zip(frame["sample_id"], frame["response_id"], strict=True))
        assert keys == expected, folder
        for r in rows:
            found = signals.row_index(r["id"], r["response_ids"])
            assert found is not None
            ids = frame["token_ids"].iloc[found].tolist()
            assert ids == r["response_ids"] and ids[-1] == _eos(tok)  # EOS kept
    # the same weights whichever command wrote them
    a, w = read_signals(tmp_path / "anc").frame, read_signals(tmp_path / "w").frame
    for r in rows:
        ia = read_signals(tmp_path / "anc").row_index(r["id"], r["response_ids"])
        iw = read_signals(tmp_path / "w").row_index(r["id"], r["response_ids"])
        assert np.array_equal(a["weight"].iloc[ia], w["weight"].iloc[iw])


def test_group_without_index_is_told_apart_by_its_responses(tmp_path: Path, loaded):
    tok = loaded(FAMILY).processor.tokenizer
    rows = _group_rows(tmp_path, tok, prompts=1, size=3)
    for r in rows:
        del r["completion_index"]
    samples = read_rollouts(_write_jsonl(tmp_path / "g.jsonl", rows)).samples
    assert [s.id for s in samples] == ["p0", "p0#1", "p0#2"]
    assert {s.trainer_id for s in samples} == {"p0"}
    assert [s.meta["reward"] for s in samples] == [0.0, 1.0, 2.0]
    assert [s.meta["advantage"] for s in samples] == [-1.5, -0.5, 0.5]


def _prompt_ids(loaded, tmp_path: Path) -> list[int]:
    ck = loaded(FAMILY)
    row = _group_rows(tmp_path, ck.processor.tokenizer, prompts=1, size=1)[0]
    sample = read_rollouts(_write_jsonl(tmp_path / "one.jsonl", [row])).samples[0]
    batch = encode_samples(ck.processor, ck.geometry, [sample])
    start, end = batch.layouts[0].prompt_span
    return batch.inputs["input_ids"][0, start:end].tolist()


def test_prompt_ids_alone_give_the_same_capture(tmp_path: Path, loaded, tiny_ckpt):
    tok = loaded(FAMILY).processor.tokenizer
    ids = _prompt_ids(loaded, tmp_path)
    row = _group_rows(tmp_path, tok, prompts=1, size=1)[0]
    with_text = {**row, "prompt_ids": ids}
    ids_only = {k: v for k, v in with_text.items() if k != "prompt"}
    ids_only["id"] = "q"
    data = _write_jsonl(tmp_path / "ids.jsonl", [row, with_text | {"id": "t"}, ids_only])
    cap = run_capture(
        CaptureRunConfig(ckpt=str(tiny_ckpt(FAMILY)), data=data, out=tmp_path / "c", qk=False)
    )
    ref = cap.tensors("p0#0")["attention"]
    for run_id in ("t#0", "q#0"):
        t = cap.tensors(run_id)
        assert t["image_positions"].tolist() == cap.tensors("p0#0")["image_positions"].tolist()
        assert float((t["attention"] - ref).abs().max()) == 0.0


def test_disagreeing_prompt_ids_are_refused_naming_the_row(tmp_path: Path, loaded, tiny_ckpt):
    tok = loaded(FAMILY).processor.tokenizer
    ids = _prompt_ids(loaded, tmp_path)
    rows = _group_rows(tmp_path, tok, prompts=1, size=2)
    rows[0]["prompt_ids"] = ids
    tampered = list(ids)
    tampered[3] = tampered[3] + 1 if tampered[3] + 1 < len(tok) else tampered[3] - 1
    rows[1]["prompt_ids"] = tampered
    data = _write_jsonl(tmp_path / "bad.jsonl", rows)
    out = tmp_path / "out"
    args = ["--ckpt", str(tiny_ckpt(FAMILY)), "--data", str(data), "--out", str(out)]
    for command in (["capture"], ["anchors"], ["weights", "--method", "anchors"]):
        result = runner.invoke(app, [*command, *args])
        assert result.exit_code == 2, result.output
        message = result.output.strip()
        assert message.count("\n") == 0 and "Traceback" not in message
        assert "row 1 (id 'p0#1')" in message and "prompt_ids" in message
        assert "first difference at token 3" in message
        assert not out.exists()  # no partial output
    # --skip-bad records it and goes on
    run = run_capture(
        CaptureRunConfig(ckpt=str(tiny_ckpt(FAMILY)), data=data, out=out, qk=False, skip_bad=True)
    )
    status = {r["id"]: (r["status"], r["sample_id"]) for r in run.rows}
    assert status == {"p0#0": ("done", "p0"), "p0#1": ("bad", "p0")}


@pytest.mark.parametrize("column", ["response_ids", "prompt_ids"])
def test_ids_beyond_the_vocabulary_are_refused(tmp_path: Path, loaded, tiny_ckpt, column):
    ck = loaded(FAMILY)
    rows = _group_rows(tmp_path, ck.processor.tokenizer, prompts=1, size=2)
    rows[1][column] = [5, ck.geometry.vocab_size, 6]
    data = _write_jsonl(tmp_path / "v.jsonl", rows)
    cfg = WeightsRunConfig(out=tmp_path / "w", ckpt=str(tiny_ckpt(FAMILY)), data=data)
    with pytest.raises(VlmCreditError) as info:
        run_weights(cfg)
    message = str(info.value)
    assert f"row 1 (id 'p0#1'): {column}[1] = {ck.geometry.vocab_size}" in message
    assert "outside the vocabulary" in message and "\n" not in message
    assert not (tmp_path / "w").exists()


# -- trainer prompt building --------------------------------------------------------------------
def _png(seed: int, size: tuple[int, int] = (84, 56)) -> bytes:
    buf = io.BytesIO()
    noise_image(size[1], size[0], seed=seed).save(buf, format="PNG")
    return buf.getvalue()


def _positions(loaded, samples) -> tuple[list[int], np.ndarray]:
    ck = loaded(FAMILY)
    batch = encode_samples(ck.processor, ck.geometry, samples)
    start, end = batch.layouts[0].prompt_span
    return batch.inputs["input_ids"][0, start:end].tolist(), batch.layouts[0].image_positions


def test_easyr1_problem_key_places_each_image_at_its_placeholder(tmp_path: Path, loaded):
    ck = loaded(FAMILY)
    table = pa.table(
        {
            "problem": ["Compare <image> with <image> please."],
            "images": [[{"bytes": _png(1)}, {"bytes": _png(2, (56, 84))}]],
            "answer": ["same"],
            "response": ["They differ."],
        }
    )
    path = tmp_path / "easyr1.parquet"
    pq.write_table(table, path)
    with pytest.raises(VlmCreditError, match="--prompt-key"):
        read_rollouts(path)
    sample = read_rollouts(path, keys=RolloutKeys(prompt="problem")).samples[0]
    assert sample.meta["extra"] == {"answer": "same"}
    ids, image_positions = _positions(loaded, [sample])
    # EasyR1's rule by hand: split on <image>, one image part at each placeholder
    parts = [
        {"type": "text", "text": "Compare "},
        {"type": "image"},
        {"type": "text", "text": " with "},
        {"type": "image"},
        {"type": "text", "text": " please."},
    ]
    text = ck.processor.apply_chat_template(
        [{"role": "user", "content": parts}], add_generation_prompt=True, tokenize=False
    )
    enc = ck.processor(text=[text], images=sample.images, return_tensors="pt")
    assert ids == enc["input_ids"][0].tolist()
    compare = ck.processor.tokenizer("Compare", add_special_tokens=False)["input_ids"]
    first = ids.index(compare[0])
    assert first < int(image_positions.min())  # the text comes before the first image
    assert "<image>" not in ck.processor.tokenizer.decode(ids)


def test_verl_prompt_building_matches_verls_own_code(tmp_path: Path, loaded, monkeypatch):
    rl_dataset = pytest.importorskip("verl.utils.dataset.rl_dataset")
    omegaconf = pytest.importorskip("omegaconf")
    import datasets
    from verl.utils.tokenizer import build_multimodal_processor_inputs
    from verl.utils.tokenizer.chat_template import apply_chat_template

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf"))
    ck = loaded(FAMILY)
    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    image = pa.struct([("bytes", pa.binary())])
    prompts = ["Left <image> mid <image> end", "<image>Only one."]
    table = pa.table(
        {
            "data_source": ["geo", "geo"],
            "prompt": pa.array(
                [
                    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": p}]
                    for p in prompts
                ],
                type=pa.list_(message),
            ),
            "images": pa.array(
                [[{"bytes": _png(3)}, {"bytes": _png(4)}], [{"bytes": _png(5)}]],
                type=pa.list_(image),
            ),
            "extra_info": [{"index": 10}, {"index": 11}],
            "response": ["a", "b"],
        }
    )
    path = tmp_path / "verl.parquet"
    pq.write_table(table, path)
    cfg = omegaconf.OmegaConf.create(
        {"filter_overlong_prompts": False, "cache_dir": str(tmp_path / "verl-cache")}
    )
    dataset = rl_dataset.RLHFDataset(str(path), ck.processor.tokenizer, cfg, ck.processor)
    ours = read_rollouts(path).samples
    assert [s.id for s in ours] == ["10", "11"]
    for k, sample in enumerate(ours):
        messages = dataset[k]["raw_prompt"]
        images = [
            p["image"]
            for m in messages
            if isinstance(m["content"], list)
            for p in m["content"]
            if p["type"] == "image"
        ]
        text = apply_chat_template(ck.processor, messages, tokenize=False)
        theirs = build_multimodal_processor_inputs(ck.processor, text=[text], images=images)
        ids, _ = _positions(loaded, [sample])
        assert ids == theirs["input_ids"][0].tolist()
