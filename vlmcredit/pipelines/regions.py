"""`vlmcredit regions` (SGUF key regions per image) and KAWHI's paragraph tables.

regions: every image of a rollout file (`--data`) or a folder (`--images`) goes through the
checkpoint's own image processor for its token grid (no model weights are loaded), is resized
as the processor resizes it and cut into merged-token cells; SGUF labels each cell. Batches are
committed as shards on the run skeleton (so `--resume` works); `regions.parquet` is assembled
from them at the end, plus overlay PNGs (key cells tinted, selected background outlined) for
the first `--preview` images.

`write_paragraph_tables` is the `weights` pipeline's step for methods that emit paragraph ids
(KAWHI): one row per response paragraph with its text, mean alpha and weight.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vlmcredit.analysis.sguf import SgufConfig, SgufResult, resize_for_grid, sguf
from vlmcredit.data.rollout_files import check_data_option
from vlmcredit.errors import VlmCreditError
from vlmcredit.formats.regions import write_paragraphs, write_regions
from vlmcredit.formats.run import Run
from vlmcredit.pipelines.skeleton import batched, drive, marks_failure, refuse_taken

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass
class RegionsRunConfig:
    out: Path
    ckpt: str
    data: Path | None = None
    images: Path | None = None
    sguf: SgufConfig = field(default_factory=SgufConfig)
    preview: int = 8
    batch_size: int = 16
    max_samples: int | None = None
    resume: bool = False
    skip_bad: bool = False
    trust_remote_code: bool = False

    def check(self) -> None:
        if (self.data is None) == (self.images is None):
            raise VlmCreditError("regions: pass exactly one of --data FILE or --images DIR")
        if self.data is not None:
            check_data_option(self.data)
        if self.images is not None and not Path(self.images).is_dir():
            raise VlmCreditError(f"--images {self.images}: no such folder")
        if self.preview < 0:
            raise VlmCreditError(f"--preview {self.preview}: must be >= 0")
        if self.batch_size < 1:
            raise VlmCreditError(f"--batch-size {self.batch_size}: must be at least 1")
        if self.max_samples is not None and self.max_samples < 1:
            raise VlmCreditError(f"--max-samples {self.max_samples}: must be at least 1")
        self.sguf.check()

    def parameters(self) -> dict[str, Any]:
        from vlmcredit.formats.provenance import file_sha1

        params: dict[str, Any] = {
            "ckpt": self.ckpt,
            "sguf": asdict(self.sguf),
            "max_samples": self.max_samples,
            "skip_bad": self.skip_bad,
            "preview": self.preview,
            "batch_size": self.batch_size,
        }
        if self.data is not None:
            params["data"] = str(Path(self.data).resolve())
            params["data_sha1"] = file_sha1(Path(self.data))
        else:
            params["images"] = str(Path(self.images).resolve())  # type: ignore[arg-type]
        return params


@dataclass
class ImageItem:
    id: str  # the sample id (rollouts) or the file name (--images)
    images: list[Any]  # PIL
    refs: list[str]


def _items(cfg: RegionsRunConfig) -> tuple[list[ImageItem], list[dict[str, Any]]]:
    """(work items, rows of skipped inputs)."""
    from vlmcredit.data.images import load_image

    if cfg.data is not None:
        from vlmcredit.data.rollouts import read_rollouts

        rollouts = read_rollouts(
            cfg.data, skip_bad=cfg.skip_bad, max_samples=cfg.max_samples, require_response=False
        )
        items = [
            ImageItem(s.id, list(s.images), [str(r) for r in s.meta.get("image_refs", [])])
            for s in rollouts.samples
            if s.images
        ]
        return items, [b.record() for b in rollouts.bad_rows]
    folder = Path(cfg.images)  # type: ignore[arg-type]
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    items, bad = [], []
    for path in files[: cfg.max_samples]:
        try:
            items.append(ImageItem(path.name, [load_image(path, folder, path.name)], [path.name]))
        except VlmCreditError as exc:
            if not cfg.skip_bad:
                raise
            bad.append({"id": path.name, "status": "bad", "error": str(exc)})
    return items, bad


def image_grids(processor: Any, images: Sequence[Any], merge: int) -> list[tuple[int, int]]:
    """(rows, cols) of merged tokens of each image, from the checkpoint's image processor."""
    out = []
    for image in images:
        enc = processor.image_processor(images=[image], return_tensors="np")
        _, h, w = (int(x) for x in np.asarray(enc["image_grid_thw"])[0])
        out.append((h // merge, w // merge))
    return out


def _sample_regions(
    item: ImageItem, processor: Any, geo: Any, cfg: SgufConfig
) -> tuple[list[SgufResult], list[np.ndarray]]:
    from vlmcredit.methods.kawhi import image_key

    results, resized = [], []
    for k, ((rows, cols), image) in enumerate(
        zip(image_grids(processor, item.images, geo.merge_size), item.images, strict=True)
    ):
        rgb = resize_for_grid(image, rows, cols, geo.cell_pixels)
        results.append(sguf(rgb, geo.cell_pixels, cfg, key=image_key(item.id, k)))
        resized.append(rgb)
    return results, resized


def _tensors(sid: str, results: Sequence[SgufResult]) -> dict[str, Any]:
    import torch

    out = {}
    for k, r in enumerate(results):
        cells = np.stack(
            [
                np.arange(r.num_cells) // r.cols,
                np.arange(r.num_cells) % r.cols,
                r.component,
                r.key.astype(np.int32),
                r.selected.astype(np.int32),
            ],
            axis=1,
        ).astype(np.int32)
        out[f"{sid}/sguf.{k}.cells"] = torch.from_numpy(cells)
        out[f"{sid}/sguf.{k}.energy"] = torch.from_numpy(r.cell_energy.astype(np.float32))
    return out


def overlay(rgb: np.ndarray, result: SgufResult, cell: int) -> np.ndarray:
    """The resized image with key cells tinted orange and selected background cells outlined."""
    out = rgb.astype(np.float32)
    key = result.key.reshape(result.rows, result.cols)
    tint = np.kron(key, np.ones((cell, cell), dtype=bool))
    out[tint] = 0.55 * out[tint] + 0.45 * np.array([255.0, 140.0, 0.0])
    background = (result.selected & ~result.key).reshape(result.rows, result.cols)
    for r, c in zip(*np.nonzero(background), strict=True):
        y0, x0 = r * cell, c * cell
        for sl in (
            (slice(y0, y0 + 1), slice(x0, x0 + cell)),
            (slice(y0 + cell - 1, y0 + cell), slice(x0, x0 + cell)),
            (slice(y0, y0 + cell), slice(x0, x0 + 1)),
            (slice(y0, y0 + cell), slice(x0 + cell - 1, x0 + cell)),
        ):
            out[sl] = (40.0, 110.0, 255.0)
    return out.clip(0, 255).astype(np.uint8)


@marks_failure
def run_regions(
    cfg: RegionsRunConfig,
    progress: Callable[[int, int], None] | None = None,
    log: Callable[[str], None] = lambda _msg: None,
) -> Run:
    """SGUF regions of every image into the run folder `cfg.out`."""
    from PIL import Image

    from vlmcredit.formats.files import sample_file_stem
    from vlmcredit.models.families import ModelGeometry, adapter_for
    from vlmcredit.models.loading import load_processor, read_model_type, resolve_checkpoint

    cfg.check()
    refuse_taken(cfg.out, cfg.resume)
    start = time.perf_counter()
    folder = resolve_checkpoint(cfg.ckpt)
    from transformers import AutoConfig

    model_type = read_model_type(folder, str(cfg.ckpt))
    adapter = adapter_for(model_type, str(cfg.ckpt))
    geo = ModelGeometry.from_config(AutoConfig.from_pretrained(folder), str(cfg.ckpt))
    processor = load_processor(folder, adapter, cfg.trust_remote_code)
    items, bad = _items(cfg)
    if not items:
        raise VlmCreditError("regions: no images found in the input")
    extra = {"checkpoint": {"id": cfg.ckpt, "path": str(folder), "geometry": asdict(geo)}}
    run = Run.open(Path(cfg.out), "regions", cfg.parameters(), cfg.resume, extra)
    if not run.rows and bad:
        run.commit(bad)
    sguf_seconds = [0.0]

    def work(batch: Sequence[ImageItem]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        rows, tensors = [], {}
        for item in batch:
            t0 = time.perf_counter()
            results, _ = _sample_regions(item, processor, geo, cfg.sguf)
            sguf_seconds[0] += time.perf_counter() - t0
            tensors.update(_tensors(item.id, results))
            rows.append(
                {
                    "id": item.id,
                    "status": "done",
                    "image_refs": item.refs,
                    "num_image_tokens": sum(r.num_cells for r in results),
                }
            )
        return rows, tensors

    drive(run, batched(items, cfg.batch_size), lambda x: x.id, work, progress, log)
    table = regions_table(run)
    write_regions(run.path, table)
    previews = run.path / "previews"
    written = 0
    for item in items[: cfg.preview]:
        results, resized = _sample_regions(item, processor, geo, cfg.sguf)
        previews.mkdir(exist_ok=True)
        for k, (r, rgb) in enumerate(zip(results, resized, strict=True)):
            name = f"{sample_file_stem(item.id)}-{k}.png"
            Image.fromarray(overlay(rgb, r, geo.cell_pixels)).save(previews / name)
            written += 1
    cells = len(table["cell"])
    run.finish(
        regions={
            "num_images": len(set(zip(table["sample_id"], table["image"], strict=True))),
            "num_cells": cells,
            "key_share": float(np.mean(table["key"])) if cells else 0.0,
            "selected_share": float(np.mean(table["selected"])) if cells else 0.0,
            "previews": written,
            "sguf_seconds": sguf_seconds[0],
        },
        seconds=time.perf_counter() - start,
    )
    return run


def regions_table(run: Run) -> dict[str, Any]:
    """regions.parquet's columns from the run's shards."""
    cols: dict[str, list[Any]] = {
        k: []
        for k in (
            "sample_id",
            "image",
            "cell",
            "row",
            "col",
            "component",
            "energy",
            "key",
            "selected",
        )
    }
    for row in run.rows:
        if row.get("status") != "done":
            continue
        t = run.tensors(row["id"], framework="np")
        k = 0
        while f"sguf.{k}.cells" in t:
            cells = np.asarray(t[f"sguf.{k}.cells"])
            n = cells.shape[0]
            cols["sample_id"].extend([row["id"]] * n)
            cols["image"].extend([k] * n)
            cols["cell"].extend(range(n))
            cols["row"].extend(cells[:, 0].tolist())
            cols["col"].extend(cells[:, 1].tolist())
            cols["component"].extend(cells[:, 2].tolist())
            cols["energy"].extend(np.asarray(t[f"sguf.{k}.energy"]).tolist())
            cols["key"].extend(cells[:, 3].astype(bool).tolist())
            cols["selected"].extend(cells[:, 4].astype(bool).tolist())
            k += 1
    return cols


# -- KAWHI paragraph tables (the weights pipeline) ----------------------------------------------
def paragraph_rows(
    sample_id: str,
    text: str,
    spans: np.ndarray,
    token_ids: Sequence[int],
    paragraph: np.ndarray,
    weight: np.ndarray,
    alpha: np.ndarray | None,
) -> list[dict[str, Any]]:
    """One row per paragraph of one response: its text (from its first token's first character
    to the next paragraph's), token count, mean alpha and weight."""
    from vlmcredit.formats.signals import response_id

    rid = response_id(list(token_ids))
    rows = []
    ids = np.unique(paragraph)
    starts = [int(spans[np.flatnonzero(paragraph == p)[0], 0]) for p in ids]
    for j, p in enumerate(ids):
        tokens = np.flatnonzero(paragraph == p)
        end = starts[j + 1] if j + 1 < len(starts) else len(text)
        rows.append(
            {
                "sample_id": sample_id,
                "response_id": rid,
                "paragraph": int(p),
                "text": text[0 if j == 0 else starts[j] : end],
                "num_tokens": int(tokens.size),
                "alpha": float(np.mean(alpha[tokens])) if alpha is not None else float("nan"),
                "weight": float(np.mean(weight[tokens])),
            }
        )
    return rows


def write_paragraph_tables(run: Run, methods: Sequence[Any], tokenizer: Any) -> None:
    """paragraphs.parquet beside each method's signals whose outputs carry `paragraph_id`."""
    from vlmcredit.formats.run import row_sample_id
    from vlmcredit.models.response_text import response_text_spans

    for m in methods:
        rows: list[dict[str, Any]] = []
        for row in run.rows:
            if row.get("status") != "done":
                continue
            t = run.tensors(row["id"])
            key = f"{m.name}.col.paragraph_id"
            if key not in t:
                break
            ids = t["response_ids"].tolist()
            text, spans = response_text_spans(tokenizer, ids)
            alpha = t.get(f"{m.name}.col.alpha")
            rows.extend(
                paragraph_rows(
                    row_sample_id(row),
                    text,
                    spans,
                    ids,
                    t[key].numpy(),
                    t[f"{m.name}.weight"].numpy(),
                    None if alpha is None else alpha.numpy(),
                )
            )
        if rows:
            folder = run.path if len(methods) == 1 else run.path / m.name
            columns: Mapping[str, list[Any]] = {k: [r[k] for r in rows] for k in rows[0]}
            write_paragraphs(folder, dict(columns))


def sguf_config(base: SgufConfig, params: Mapping[str, Any]) -> SgufConfig:
    """`base` with `-p NAME=VALUE` applied (the same parsing as method parameters), checked."""
    from vlmcredit.methods.registry import _set_param

    for key, value in params.items():
        _set_param(base, key, value, "regions (SGUF)")
    base.check()
    return base
