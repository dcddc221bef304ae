"""Where an anchors run gets its attention, and what it stores per sample.

Two sources give the same `SourceItem`s for a batch: a capture done now with a checkpoint, or a
finished `vlmcredit capture` run read back from disk (no model needed).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vlmcredit.analysis.anchors import AnchorResult
from vlmcredit.errors import VlmCreditError
from vlmcredit.formats.run import Run

THUMB_MAX = 448  # long side of the stored image thumbnails (report heat maps)


@dataclass
class SourceItem:
    """One sample's captured attention, ready for analysis."""

    row: dict[str, Any]  # the samples.parquet row (spans, refs, counts)
    response_ids: list[int]
    attention: np.ndarray  # (L, H, T, N) as captured
    image_boxes: np.ndarray  # (N, 4)
    image_owner: np.ndarray  # (N,)
    images: list[Any] | None  # PIL images for thumbnails, when at hand


# -- sources ------------------------------------------------------------------------------------
def capture_items(ck: Any, spec: Any, batch: Sequence[Any]) -> tuple[list[SourceItem], float]:
    """Capture one batch of samples now; returns the items and the capture seconds."""
    from vlmcredit.pipelines.capture import sample_row
    from vlmcredit.probes.response_attention import capture_samples

    start = time.perf_counter()
    captured = capture_samples(ck, batch, spec)
    seconds = time.perf_counter() - start
    items = []
    for item in captured:
        images = item.layout.images
        items.append(
            SourceItem(
                sample_row(item),
                list(item.response_ids),
                item.capture.attention.float().numpy(),
                np.concatenate([im.boxes for im in images]) if images else np.zeros((0, 4)),
                np.asarray(item.layout.image_token_owner),
                list(item.sample.images),
            )
        )
    return items, seconds


def capture_run_items(
    capture: Run, rows: Sequence[dict[str, Any]], images: dict[str, list[Any]]
) -> list[SourceItem]:
    """Read one batch of rows from a finished capture run (no model needed)."""
    items = []
    for row in rows:
        t = capture.tensors(row["id"])
        if "attention" not in t:
            raise VlmCreditError(
                f"--from {capture.path}: sample {row['id']} has no attention (captured with "
                "--no-attention?); capture it again"
            )
        items.append(
            SourceItem(
                {k: row.get(k) for k in row if k != "shard"},
                t["response_ids"].tolist(),
                t["attention"].float().numpy(),
                t["image_boxes"].numpy() if "image_boxes" in t else np.zeros((0, 4)),
                t["image_owner"].numpy(),
                images.get(row["id"]),
            )
        )
    return items


def images_of_capture_run(capture: Run) -> dict[str, list[Any]]:
    """The capture run's images (for thumbnails) when its data file is still there unchanged."""
    from vlmcredit.data.rollouts import RolloutKeys, read_rollouts
    from vlmcredit.formats.provenance import file_sha1

    params = capture.manifest.get("parameters", {})
    data = Path(params.get("data", ""))
    if not data.is_file() or file_sha1(data) != params.get("data_sha1"):
        return {}
    # the capture's own column names, so run ids (group members' "id#k" included) line up
    default = RolloutKeys()
    keys = RolloutKeys(
        prompt=params.get("prompt_key", default.prompt),
        images=params.get("image_key", default.images),
        response=params.get("response_key", default.response),
    )
    rollouts = read_rollouts(
        data,
        skip_bad=True,
        max_samples=params.get("max_samples"),
        require_response=not params.get("generate"),
        keys=keys,
    )
    return {s.id: list(s.images) for s in rollouts.samples}


# -- what is stored per sample ------------------------------------------------------------
def thumbnail(image: Any) -> tuple[np.ndarray, float]:
    """A small RGB copy of `image` and its scale (thumbnail pixels per original pixel)."""
    scale = min(1.0, THUMB_MAX / max(image.width, image.height))
    small = image.convert("RGB")
    if scale < 1.0:
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        small = small.resize(size)
    return np.asarray(small, dtype=np.uint8), scale


def sample_tensors(
    item: SourceItem,
    result: AnchorResult,
    att: np.ndarray,
    capture_seconds: float,
    wall_seconds: float = 0.0,
) -> dict[str, Any]:
    """One sample's shard tensors; `timing` = (capture, graph, cluster, wall) seconds, wall being
    its share of the invocation's time up to the batch's commit (so totals survive a kill)."""
    import torch

    sid = item.row["id"]
    clusters = np.array(
        [[c.size, c.mean_connectivity, float(c.anchor)] for c in result.clusters], dtype=np.float64
    ).reshape(-1, 3)
    out: dict[str, Any] = {
        f"{sid}/response_ids": torch.tensor(item.response_ids, dtype=torch.long),
        f"{sid}/attention": torch.from_numpy(np.ascontiguousarray(att, dtype=np.float32)),
        f"{sid}/connectivity": torch.from_numpy(result.connectivity.astype(np.float32)),
        f"{sid}/cluster": torch.from_numpy(result.cluster.astype(np.int32)),
        f"{sid}/anchor": torch.from_numpy(result.anchor.astype(np.uint8)),
        f"{sid}/weight": torch.from_numpy(result.weight.astype(np.float32)),
        f"{sid}/threshold_anchor": torch.from_numpy(result.threshold_anchor.astype(np.uint8)),
        f"{sid}/clusters": torch.from_numpy(clusters),
        f"{sid}/timing": torch.tensor(
            [
                capture_seconds,
                result.timing.get("graph", 0.0),
                result.timing.get("cluster", 0.0),
                wall_seconds,
            ],
            dtype=torch.float64,
        ),
        f"{sid}/image_boxes": torch.from_numpy(np.asarray(item.image_boxes, dtype=np.float32)),
        f"{sid}/image_owner": torch.from_numpy(np.asarray(item.image_owner, dtype=np.int64)),
    }
    if result.modularity is not None:
        out[f"{sid}/modularity"] = torch.tensor([result.modularity], dtype=torch.float64)
    for k, image in enumerate(item.images or []):
        pixels, scale = thumbnail(image)
        out[f"{sid}/thumb.{k}"] = torch.from_numpy(pixels.copy())
        out[f"{sid}/thumb_scale.{k}"] = torch.tensor(scale, dtype=torch.float32)
    return out
