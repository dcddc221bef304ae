"""Run folders in the documented formats (docs/FORMATS.md), written through formats.run.Run.

The commands that produce these runs are written in parallel; the report tests build the folders
here, with realistic shapes: 2-image samples (a 12 x 16 cell grid and an 8 x 8 one), 300-token
responses with planted clusters of high image connectivity, heads runs in both modes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from vlmcredit.data.mme import CATEGORIES, PERCEPTION
from vlmcredit.formats.files import atomic_write_json, atomic_write_parquet
from vlmcredit.formats.run import Run

MME_CATEGORIES = list(CATEGORIES)
WORDS = [
    " the",
    " red",
    " car",
    " is",
    " parked",
    " next",
    " to",
    " a",
    " tree",
    ".",
    " There",
    " are",
    " two",
    " people",
    " on",
    " left",
    " side",
    ",",
    " and",
    " sky",
    " blue",
    "\n\n",
    " so",
    " answer",
    ":",
    " yes",
    " 3",
    " because",
    " sign",
    " says",
]


def checkpoint_record(num_layers: int = 4, num_heads: int = 16) -> dict[str, Any]:
    return {
        "id": "tiny/qwen2.5-vl",
        "path": "/nonexistent/tiny-qwen2.5-vl",
        "family": "qwen2.5-vl",
        "weights_sha1": "0" * 40,
        "tokenizer_sha1": "1" * 40,
        "geometry": {
            "family": "qwen2.5-vl",
            "num_layers": num_layers,
            "num_heads": num_heads,
            "num_kv_heads": 2,
            "head_dim": 16,
        },
    }


def synthetic_thumb(height: int, width: int, seed: int) -> np.ndarray:
    """A picture-like uint8 image: gradient sky, ground, a few solid shapes."""
    rs = np.random.RandomState(seed)
    y, x = np.mgrid[0:height, 0:width]
    img = np.zeros((height, width, 3), dtype=np.float64)
    img[..., 0] = 120 + 80 * y / height
    img[..., 1] = 160 + 60 * x / width
    img[..., 2] = 230 - 100 * y / height
    img[y > 0.6 * height] = (90, 140, 70)
    for _ in range(3):
        cy, cx = rs.randint(0, height), rs.randint(0, width)
        r = rs.randint(height // 10 + 1, height // 4 + 2)
        img[(y - cy) ** 2 + (x - cx) ** 2 < r * r] = rs.randint(0, 255, 3)
    return img.clip(0, 255).astype(np.uint8)


@dataclass
class ImageSpec:
    """One image of a sample: merged-cell grid and original size in pixels."""

    rows: int
    cols: int
    width: int
    height: int

    def boxes(self) -> np.ndarray:
        xs = np.linspace(0, self.width, self.cols + 1)
        ys = np.linspace(0, self.height, self.rows + 1)
        cells = [(r, c) for r in range(self.rows) for c in range(self.cols)]
        return np.array([[xs[c], ys[r], xs[c + 1], ys[r + 1]] for r, c in cells], np.float32)


DEFAULT_IMAGES = (ImageSpec(12, 16, 640, 480), ImageSpec(8, 8, 300, 300))


@dataclass
class PlantedSample:
    """What the fixture planted in one sample (the tests' independent reference)."""

    sample_id: str
    tokens: list[str]
    token_ids: list[int]
    cluster: np.ndarray
    connectivity: np.ndarray
    anchor: np.ndarray
    attention: np.ndarray
    boxes: np.ndarray
    owner: np.ndarray
    weight: np.ndarray


@dataclass
class AnchorsRun:
    path: Path
    samples: list[PlantedSample] = field(default_factory=list)


def _plant_sample(
    sample_id: str,
    num_tokens: int,
    images: tuple[ImageSpec, ...],
    rs: np.random.RandomState,
    tokens: list[str] | None,
    threshold_mode: bool,
) -> PlantedSample:
    num_tokens = len(tokens) if tokens is not None else num_tokens
    boxes = np.concatenate([im.boxes() for im in images])
    owner = np.concatenate([np.full(im.rows * im.cols, k) for k, im in enumerate(images)])
    n = len(boxes)
    # Five clusters; 0 and 1 look hard at one spot each (high connectivity = anchors).
    sizes = np.array([0.08, 0.07, 0.25, 0.3, 0.3])
    cluster = rs.choice(5, size=num_tokens, p=sizes / sizes.sum()).astype(np.int32)
    levels = np.array([0.55, 0.4, 0.08, 0.05, 0.03])
    connectivity = np.clip(levels[cluster] + rs.normal(0, 0.02, num_tokens), 0.001, 0.95)
    centres = rs.randint(0, n, size=5)
    cx = (boxes[:, 0] + boxes[:, 2]) / 2
    cy = (boxes[:, 1] + boxes[:, 3]) / 2
    attention = np.empty((num_tokens, n))
    for c in range(5):
        same = owner == owner[centres[c]]
        d2 = (cx - cx[centres[c]]) ** 2 + (cy - cy[centres[c]]) ** 2
        pattern = np.where(same, np.exp(-d2 / (2 * 60.0**2)), 0.0) + 0.02
        rows = cluster == c
        noise = rs.rand(rows.sum(), n) * 0.2 + 1.0
        block = pattern[None, :] * noise
        attention[rows] = block / block.sum(axis=1, keepdims=True)
    attention *= connectivity[:, None]
    anchor = cluster <= 1
    if threshold_mode:
        k = max(1, round(0.15 * num_tokens))
        anchor = np.zeros(num_tokens, bool)
        anchor[np.argsort(-connectivity, kind="stable")[:k]] = True
        cluster = np.full(num_tokens, -1, np.int32)
    if tokens is None:
        ids = rs.randint(0, len(WORDS), size=num_tokens)
        tokens = [WORDS[i] for i in ids]
        token_ids = [int(i) + 100 for i in ids]
    else:
        token_ids = [1000 + i for i in range(len(tokens))]
    return PlantedSample(
        sample_id,
        tokens,
        token_ids,
        cluster,
        connectivity.astype(np.float32),
        anchor,
        attention.astype(np.float32),
        boxes,
        owner,
        np.where(anchor, 1.0, 0.0).astype(np.float32),
    )


def write_anchors_run(
    path: Path,
    *,
    num_samples: int = 3,
    num_tokens: int = 300,
    images: tuple[ImageSpec, ...] = DEFAULT_IMAGES,
    thumbs: bool = True,
    signals: bool = True,
    sample_ids: list[str] | None = None,
    responses: dict[str, list[str]] | None = None,
    threshold_mode: bool = False,
    argv: list[str] | None = None,
    seed: int = 0,
) -> AnchorsRun:
    """An anchors run folder: manifest, samples.parquet, shards, anchors.parquet/.json, signals."""
    rs = np.random.RandomState(seed)
    params = {"ratio": 0.15, "backend": "leiden", "resolution": 1.0, "seed": seed, "sink": "none"}
    run = Run.open(
        path, "anchors", params, resume=False, extra={"checkpoint": checkpoint_record(3, 4)}
    )
    if argv is not None:
        run.manifest["argv"] = argv
    ids = sample_ids or [f"s{i}" for i in range(num_samples)]
    out = AnchorsRun(path)
    for i, sid in enumerate(ids):
        planted = _plant_sample(
            sid, num_tokens, images, rs, (responses or {}).get(sid), threshold_mode
        )
        out.samples.append(planted)
        tensors: dict[str, Any] = {
            f"{sid}/attention": torch.from_numpy(planted.attention),
            f"{sid}/image_boxes": torch.from_numpy(planted.boxes),
            f"{sid}/image_owner": torch.from_numpy(planted.owner.astype(np.int64)),
            f"{sid}/response_ids": torch.tensor(planted.token_ids, dtype=torch.long),
        }
        if thumbs:
            for k, im in enumerate(images):
                scale = min(1.0, 448 / max(im.width, im.height))
                h, w = round(im.height * scale), round(im.width * scale)
                tensors[f"{sid}/thumb.{k}"] = torch.from_numpy(synthetic_thumb(h, w, seed + k))
                tensors[f"{sid}/thumb_scale.{k}"] = torch.tensor(scale, dtype=torch.float32)
        row = {
            "id": sid,
            "row": i,
            "status": "done",
            "error": None,
            "image_refs": [f"img{k}.png" for k in range(len(images))],
            "prompt_span": [0, 40],
            "response_span": [40, 40 + len(planted.tokens)],
            "num_response_tokens": len(planted.tokens),
            "num_image_tokens": len(planted.boxes),
        }
        run.commit([row], tensors)

    frames = []
    per_sample = []
    for s in out.samples:
        frames.append(
            pd.DataFrame(
                {
                    "sample_id": s.sample_id,
                    "token_index": np.arange(len(s.tokens), dtype=np.int32),
                    "token_id": np.asarray(s.token_ids, dtype=np.int64),
                    "token": s.tokens,
                    "connectivity": s.connectivity,
                    "cluster": s.cluster,
                    "anchor": s.anchor,
                    "weight": s.weight,
                    "threshold_anchor": s.anchor,
                }
            )
        )
        clusters = []
        for c in sorted(set(s.cluster.tolist()) - {-1}):
            m = s.cluster == c
            clusters.append(
                {
                    "id": c,
                    "size": int(m.sum()),
                    "mean_connectivity": float(s.connectivity[m].mean()),
                    "anchor": bool(s.anchor[m].all()),
                }
            )
        per_sample.append(
            {
                "sample_id": s.sample_id,
                "num_tokens": len(s.tokens),
                "num_anchors": int(s.anchor.sum()),
                "ratio_achieved": float(s.anchor.mean()),
                "modularity": 0.42,
                "clusters": clusters,
            }
        )
    table = pd.concat(frames, ignore_index=True)
    atomic_write_parquet(path / "anchors.parquet", table)
    conn = table["connectivity"].to_numpy()
    anchor = table["anchor"].to_numpy()
    counts, edges = np.histogram(conn, bins=30)
    summary = {
        "ratio_target": 0.15,
        "ratio_achieved": float(anchor.mean()),
        "num_samples": len(out.samples),
        "num_tokens": int(anchor.size),
        "num_anchors": int(anchor.sum()),
        "agreement": {"jaccard": 0.8, "precision": 0.9, "recall": 0.87},
        "connectivity": {
            "histogram": {"edges": edges.tolist(), "counts": counts.tolist()},
            "bimodality_coefficient": 0.71,
            "cut": float(conn[anchor].min()),
        },
        "timing": {"capture": 1.5, "graph": 0.25, "cluster": 0.5, "total": 2.5},
    }
    atomic_write_json(
        path / "anchors.json", {**summary, "parameters": params, "samples": per_sample}
    )
    if signals:
        write_signals(path, out.samples, run)
    run.finish(anchors=summary)
    return out


def response_id(token_ids: list[int]) -> str:
    return hashlib.sha1(",".join(str(i) for i in token_ids).encode("ascii")).hexdigest()


def write_signals(path: Path, samples: list[PlantedSample], run: Run | None = None) -> None:
    """signals.parquet + the manifest's `signals` object (FORMATS.md)."""
    rows = [
        {
            "sample_id": s.sample_id,
            "response_id": response_id(s.token_ids),
            "token_ids": list(s.token_ids),
            "weight": s.weight.tolist(),
            "mask": s.anchor.tolist(),
            "cluster_id": s.cluster.tolist(),
        }
        for s in samples
    ]
    atomic_write_parquet(path / "signals.parquet", pd.DataFrame(rows))
    meta = {
        "format": "vlmcredit-signals",
        "format_version": 1,
        "tool_version": "0.test",
        "method": "anchors",
        "parameters": {"ratio": 0.15, "other_weight": 0.0},
        "checkpoint": {"id": "tiny/qwen2.5-vl", "weights_sha1": "0" * 40},
        "tokenizer_sha1": "1" * 40,
        "loss_denominator": "all_tokens",
        "selection_scope": "per_response",
        "created": "2025-01-01T00:00:00+0000",
        "num_rows": len(rows),
        "columns": ["sample_id", "response_id", "token_ids", "weight", "mask", "cluster_id"],
    }
    if run is not None:
        run.manifest["signals"] = meta
        run.write_manifest()
    else:
        manifest = json.loads((path / "manifest.json").read_text())
        manifest["signals"] = meta
        atomic_write_json(path / "manifest.json", manifest)


@dataclass
class HeadsRun:
    path: Path
    report: dict[str, Any]


def write_heads_run(
    path: Path,
    *,
    mode: str = "head-index",
    num_layers: int = 4,
    num_heads: int = 16,
    critical_heads: tuple[int, ...] = (0, 1, 3, 12),
    threshold: float = 100.0,
    seed: int = 0,
) -> HeadsRun:
    """A probe-heads run: heads.json and heads.parquet with planted vision-critical heads."""
    rs = np.random.RandomState(seed)
    params = {"mode": mode, "ablation": "zero", "metric": "total", "threshold": threshold}
    ck = checkpoint_record(num_layers, num_heads)
    run = Run.open(path, "probe-heads", params, resume=False, extra={"checkpoint": ck})
    base_sub = {
        c: {"acc": a, "acc_plus": a - 0.1, "score": round(100 * (2 * a - 0.1), 4)}
        for c, a in zip(
            MME_CATEGORIES, rs.uniform(0.7, 0.95, len(MME_CATEGORIES)).tolist(), strict=True
        )
    }

    def totals(sub: dict[str, float]) -> dict[str, float]:
        perception = sum(v for k, v in sub.items() if k in PERCEPTION)
        cognition = sum(v for k, v in sub.items() if k not in PERCEPTION)
        return {"total": perception + cognition, "perception": perception, "cognition": cognition}

    baseline_scores = {c: v["score"] for c, v in base_sub.items()}
    baseline = {**totals(baseline_scores), "subtasks": base_sub}
    configs = (
        [(None, h) for h in range(num_heads)]
        if mode == "head-index"
        else [(layer, h) for layer in range(num_layers) for h in range(num_heads)]
    )
    heads = []
    for layer, head in configs:
        hit = head in critical_heads and (layer is None or layer == num_layers - 1)
        loss = float(rs.uniform(15, 40) if hit else rs.uniform(-3, 6))
        sub = {c: round(s - loss, 4) for c, s in baseline_scores.items()}
        scores = totals(sub)
        drop = {k: baseline[k] - scores[k] for k in ("total", "perception", "cognition")}
        heads.append(
            {
                "layer": layer,
                "head": head,
                "scores": scores,
                "drop": drop,
                "subtasks": sub,
                "critical": bool(drop["total"] > threshold),
            }
        )
    critical = [{"layer": h["layer"], "head": h["head"]} for h in heads if h["critical"]]
    report = {
        "checkpoint": ck,
        "mode": mode,
        "ablation": "zero",
        "answering": "logits",
        "metric": "total",
        "threshold": threshold,
        "num_questions": 2 * 14 * 5,
        "categories": MME_CATEGORIES,
        "baseline": baseline,
        "heads": heads,
        "critical": critical,
        "critical_heads": sorted({c["head"] for c in critical}),
    }
    atomic_write_json(path / "heads.json", report)
    rows = []
    for h in heads:
        row = {
            "layer": -1 if h["layer"] is None else h["layer"],
            "head": h["head"],
            **h["scores"],
            **{f"drop_{k}": v for k, v in h["drop"].items()},
            "critical": h["critical"],
        }
        row.update({f"score_{c}": v for c, v in h["subtasks"].items()})
        rows.append(row)
    atomic_write_parquet(path / "heads.parquet", pd.DataFrame(rows))
    run.finish(critical_heads=report["critical_heads"])
    return HeadsRun(path, report)


def write_capture_run(path: Path) -> Path:
    """A finished run with nothing the report draws (no heads/anchors/signals tables)."""
    run = Run.open(path, "capture", {"layers": "all"}, resume=False)
    run.finish(samples_done=0, samples_bad=0)
    return path
