"""`vlmcredit compare --ckpt A --ckpt B ... --data ROLLOUTS` as a library call: how connectivity,
anchors and vision-critical heads change between checkpoints on the same rollouts.

With checkpoints, every one is run through the `anchors` pipeline on the same rollouts into
OUT/ckpt-<k>/anchors (and, with an MME set, through `probe-heads` into OUT/ckpt-<k>/heads),
with those commands' defaults; a sub-run that finished with the same parameters is reused as
it is, an interrupted one resumed. With finished runs (`--anchors-run` / `--heads-run`, one per
checkpoint, in order) nothing is computed. Either way the tables are checked to hold the same
rollouts (sample ids, response tokens, token ids, tokenizer) and the same MME set, and
`analysis.checkpoints` turns them into per-checkpoint figures and every pair's shift, written by
`formats.checkpoints` (checkpoints.json, checkpoints.parquet, checkpoint_heads.parquet).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmcredit.analysis.checkpoints import (
    CheckpointHeads,
    CheckpointTokens,
    compare_checkpoints,
    heads_mismatch,
    rollout_mismatch,
)
from vlmcredit.data.rollout_files import check_data_option
from vlmcredit.errors import VlmCreditError
from vlmcredit.formats.anchors import read_anchor_tokens
from vlmcredit.formats.checkpoints import KIND, write_checkpoints
from vlmcredit.formats.heads import HEADS_JSON, read_heads
from vlmcredit.formats.run import MANIFEST, Run, read_manifest
from vlmcredit.pipelines.skeleton import marks_failure, refuse_taken

COMMAND = "compare-checkpoints"
Progress = Callable[[int, int], None]
# stage(name) -> a context giving the progress callback of one sub-run (a bar per sub-run)
Stage = Callable[[str], AbstractContextManager[Progress | None]]


@dataclass
class CheckpointCompareConfig:
    out: Path
    ckpts: list[str] = field(default_factory=list)  # compute now with these checkpoints ...
    data: Path | None = None
    mme: Path | None = None
    anchors_runs: list[Path] = field(default_factory=list)  # ... or read finished runs
    heads_runs: list[Path] = field(default_factory=list)
    batch_size: int = 4  # anchors sub-runs (probe-heads keeps its own default)
    max_samples: int | None = None
    max_questions: int | None = None  # probe-heads sub-runs: quick look at about N questions
    dtype: str = "auto"
    device: str | None = None
    device_map: str | None = None
    resume: bool = False
    trust_remote_code: bool = False
    prompt_key: str = "prompt"
    image_key: str = "images"
    response_key: str = "response"

    @property
    def computes(self) -> bool:
        return bool(self.ckpts)

    def check(self) -> None:
        runs = self.anchors_runs or self.heads_runs
        if self.ckpts and runs:
            raise VlmCreditError(
                "--ckpt and --anchors-run/--heads-run: compare checkpoints now (--ckpt ... --data) "
                "or finished runs, not both"
            )
        if self.ckpts:
            if len(self.ckpts) < 2:
                raise VlmCreditError(
                    f"--ckpt {self.ckpts[0]}: give at least two (--ckpt A --ckpt B) to compare"
                )
            if self.data is None:
                raise VlmCreditError(
                    "--ckpt: pass --data ROLLOUTS, the rollouts every checkpoint is run on"
                )
            check_data_option(self.data)
            if self.mme is not None and not Path(self.mme).exists():
                raise VlmCreditError(f"--mme {self.mme}: no such file or folder")
        elif runs:
            for name, given in (
                ("--anchors-run", self.anchors_runs),
                ("--heads-run", self.heads_runs),
            ):
                if len(given) == 1:
                    raise VlmCreditError(
                        f"{name} {given[0]}: give at least two, one per checkpoint"
                    )
            if (
                self.anchors_runs
                and self.heads_runs
                and len(self.anchors_runs) != len(self.heads_runs)
            ):
                raise VlmCreditError(
                    f"{len(self.anchors_runs)} --anchors-run and {len(self.heads_runs)} "
                    "--heads-run: give one of each per checkpoint, in the same order"
                )
            for option, value in (("--data", self.data), ("--mme", self.mme)):
                if value is not None:
                    raise VlmCreditError(
                        f"{option} {value}: goes with --ckpt (the runs already name their data)"
                    )
        else:
            raise VlmCreditError(
                "compare: pass --ckpt A --ckpt B --data ROLLOUTS, or --anchors-run / --heads-run "
                "per checkpoint"
            )
        if self.batch_size < 1:
            raise VlmCreditError(f"--batch-size {self.batch_size}: must be at least 1")
        if self.max_samples is not None and self.max_samples < 1:
            raise VlmCreditError(f"--max-samples {self.max_samples}: must be at least 1")
        if self.max_questions is not None and self.mme is None:
            raise VlmCreditError(f"--max-questions {self.max_questions}: goes with --mme")
        if self.max_questions is not None and self.max_questions < 2:
            raise VlmCreditError(
                f"--max-questions {self.max_questions}: must be at least 2 (MME scores both "
                "questions of an image)"
            )

    def parameters(self) -> dict[str, Any]:
        """What a resume must match (the sub-runs check their own parameters too)."""
        if not self.computes:
            return {
                "anchors_runs": [str(Path(p).resolve()) for p in self.anchors_runs],
                "heads_runs": [str(Path(p).resolve()) for p in self.heads_runs],
            }
        from vlmcredit.formats.provenance import file_sha1

        return {
            "ckpts": list(self.ckpts),
            "data": str(Path(self.data).resolve()),  # type: ignore[arg-type]
            "data_sha1": file_sha1(Path(self.data)),  # type: ignore[arg-type]
            "mme": None if self.mme is None else str(Path(self.mme).resolve()),
            "batch_size": self.batch_size,
            "max_samples": self.max_samples,
            "max_questions": self.max_questions,
            "dtype": self.dtype,
            "keys": [self.prompt_key, self.image_key, self.response_key],
        }


def subrun_folder(out: Path, index: int, kind: str) -> Path:
    """OUT/ckpt-<k>/anchors or OUT/ckpt-<k>/heads."""
    return Path(out) / f"ckpt-{index}" / kind


def _finished_with(folder: Path, command: str, parameters: dict[str, Any]) -> bool:
    """A finished run of `command` in `folder` whose parameters include `parameters`."""
    if not (folder / MANIFEST).is_file():
        return False
    manifest = read_manifest(folder)
    stored = manifest.get("parameters") or {}
    wanted = json.loads(json.dumps(parameters, sort_keys=True, default=str))
    return (
        manifest.get("command") == command
        and manifest.get("status") == "finished"
        and all(stored.get(k) == v for k, v in wanted.items())
    )


def _run_subruns(
    cfg: CheckpointCompareConfig, stage: Stage, log: Callable[[str], None]
) -> tuple[list[Path], list[Path]]:
    """Anchors (and probe-heads) sub-runs of every checkpoint; reused when finished."""
    from vlmcredit.pipelines.anchors import AnchorsRunConfig, run_anchors
    from vlmcredit.pipelines.probe_heads import ProbeHeadsConfig, run_probe_heads

    anchors_runs, heads_runs = [], []
    for k, ckpt in enumerate(cfg.ckpts):
        folder = subrun_folder(cfg.out, k, "anchors")
        acfg = AnchorsRunConfig(
            out=folder,
            ckpt=ckpt,
            data=cfg.data,
            batch_size=cfg.batch_size,
            max_samples=cfg.max_samples,
            dtype=cfg.dtype,
            device=cfg.device,
            device_map=cfg.device_map,
            resume=(folder / MANIFEST).is_file(),
            trust_remote_code=cfg.trust_remote_code,
            prompt_key=cfg.prompt_key,
            image_key=cfg.image_key,
            response_key=cfg.response_key,
        )
        acfg.check()
        if _finished_with(folder, "anchors", acfg.parameters()):
            log(f"{folder}: finished earlier, reused")
        else:
            with stage(f"anchors {k + 1}/{len(cfg.ckpts)}") as progress:
                run_anchors(acfg, progress=progress, log=log)
        anchors_runs.append(folder)
        if cfg.mme is None:
            continue
        folder = subrun_folder(cfg.out, k, "heads")
        hcfg = ProbeHeadsConfig(
            ckpt=ckpt,
            mme=cfg.mme,
            out=folder,
            max_questions=cfg.max_questions,
            dtype=cfg.dtype,
            device=cfg.device,
            device_map=cfg.device_map,
            trust_remote_code=cfg.trust_remote_code,
            resume=(folder / MANIFEST).is_file(),
        )
        if (
            _finished_with(folder, "probe-heads", hcfg.parameters())
            and (folder / HEADS_JSON).is_file()
        ):
            log(f"{folder}: finished earlier, reused")
        else:
            with stage(f"probe-heads {k + 1}/{len(cfg.ckpts)}") as progress:
                run_probe_heads(hcfg, progress=progress, log=log)
        heads_runs.append(folder)
    return anchors_runs, heads_runs


# -- reading the runs -----------------------------------------------------------------------------
def _short(ckpt: Any) -> str:
    text = str(ckpt or "").rstrip("/")
    if text.startswith("builtin:"):
        return text.removeprefix("builtin:")
    return Path(text).name or text or "?"


def _anchors_manifest(run: Path, option: str) -> dict[str, Any]:
    try:
        manifest = read_manifest(run)
    except VlmCreditError:
        raise VlmCreditError(
            f"{option} {run}: not a run folder (no {MANIFEST}); pass a finished anchors run"
        ) from None
    if manifest.get("command") != "anchors":
        raise VlmCreditError(
            f"{option} {run}: is a '{manifest.get('command')}' run, not an anchors run; pass "
            "folders written by vlmcredit anchors"
        )
    if manifest.get("status") != "finished":
        raise VlmCreditError(
            f"{option} {run}: the anchors run did not finish; resume it (vlmcredit anchors ... "
            "--resume)"
        )
    return manifest


def load_tokens(run: Path, label: str) -> CheckpointTokens:
    """An anchors run's token table as `CheckpointTokens` (the run must be finished)."""
    frame = read_anchor_tokens(run)
    if frame.empty:
        raise VlmCreditError(f"{run}: the anchors run holds no tokens; rerun vlmcredit anchors")
    return CheckpointTokens(
        label=label,
        sample_id=frame["sample_id"].astype(str).to_numpy(),
        token_index=frame["token_index"].to_numpy(),
        connectivity=frame["connectivity"].to_numpy(),
        anchor=frame["anchor"].to_numpy(),
        token_id=frame["token_id"].to_numpy() if "token_id" in frame.columns else None,
    )


def load_heads(run: Path, label: str) -> tuple[CheckpointHeads, dict[str, Any]]:
    """A probe-heads run's (or heads.json's) drops as `CheckpointHeads`, and the file."""
    report = read_heads(run, full=True)
    metric = str(report.get("metric") or "total")
    baseline = report["baseline"]
    drops, critical = {}, set()
    for h in report["heads"]:
        key = (h["layer"], int(h["head"]))
        drops[key] = float(h["drop"][metric])
        if h["critical"]:
            critical.add(key)
    heads = CheckpointHeads(
        label=label,
        metric=metric,
        baseline=float(baseline[metric]),
        baseline_total=float(baseline.get("total", baseline[metric])),
        drops=drops,
        critical=critical,
        mode=str(report.get("mode") or "head-index"),
    )
    return heads, report


def _heads_manifest(run: Path) -> dict[str, Any]:
    folder = Path(run) if Path(run).is_dir() else Path(run).parent
    try:
        return read_manifest(folder)
    except VlmCreditError:  # a bare heads.json: only its own contents to go by
        return {}


def _same(values: Sequence[Any], runs: Sequence[Path], what: str, todo: str) -> None:
    """Refuse when two runs record different non-empty `values` (hashes)."""
    first = next(((v, r) for v, r in zip(values, runs, strict=True) if v), None)
    if first is None:
        return
    for value, run in zip(values, runs, strict=True):
        if value and value != first[0]:
            raise VlmCreditError(f"{run}: {what} differ from those of {first[1]}; {todo}")


def _labels(names: Sequence[str]) -> list[str]:
    if len(set(names)) == len(names):
        return list(names)
    return [f"{k}-{name}" for k, name in enumerate(names)]


# -- the run --------------------------------------------------------------------------------------
def compare_checkpoint_runs(
    anchors_runs: Sequence[Path],
    heads_runs: Sequence[Path],
    names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The comparison of finished runs, one (anchors and / or heads) per checkpoint, in order."""
    anchors_runs, heads_runs = [Path(p) for p in anchors_runs], [Path(p) for p in heads_runs]
    n = len(anchors_runs) or len(heads_runs)
    manifests = [_anchors_manifest(r, "--anchors-run") for r in anchors_runs]
    heads_manifests = [_heads_manifest(r) for r in heads_runs]
    checkpoint_of = [m.get("checkpoint") or {} for m in manifests] or [
        m.get("checkpoint") or {} for m in heads_manifests
    ]
    if names is None:
        names = [
            _short(ck.get("id") or ck.get("path") or r.name)
            for ck, r in zip(checkpoint_of, anchors_runs or heads_runs, strict=True)
        ]
    labels = _labels(names)

    tokens = None
    if anchors_runs:
        _same(
            [(m.get("checkpoint") or {}).get("tokenizer_sha1") for m in manifests],
            anchors_runs,
            "its tokenizer and vocabulary (tokenizer_sha1)",
            "compare checkpoints that share a tokenizer",
        )
        _same(
            [(m.get("parameters") or {}).get("data_sha1") for m in manifests],
            anchors_runs,
            "its rollouts (data_sha1)",
            "run anchors on the same --data for every checkpoint",
        )
        tokens = [load_tokens(r, label) for r, label in zip(anchors_runs, labels, strict=True)]
        for i in range(1, n):
            problem = rollout_mismatch(tokens[0], tokens[i])
            if problem:
                raise VlmCreditError(
                    f"{anchors_runs[i]}: does not hold the same rollouts as {anchors_runs[0]} "
                    f"({problem}); run anchors on the same --data with the same tokenizer"
                )
    heads = None
    if heads_runs:
        _same(
            [(m.get("parameters") or {}).get("mme_sha1") for m in heads_manifests],
            heads_runs,
            "its MME questions (mme_sha1)",
            "run probe-heads on the same --mme (and --max-questions / --categories)",
        )
        loaded = [load_heads(r, label) for r, label in zip(heads_runs, labels, strict=True)]
        heads = [h for h, _ in loaded]
        counts = [rep.get("num_questions") for _, rep in loaded]
        _same(
            [str(c) if c is not None else None for c in counts],
            heads_runs,
            "its number of MME questions",
            "run probe-heads on the same --mme with the same options",
        )
        for i in range(1, n):
            problem = heads_mismatch(heads[0], heads[i])
            if problem:
                raise VlmCreditError(
                    f"{heads_runs[i]}: its head ablation differs from {heads_runs[0]} ({problem}); "
                    "run probe-heads with the same options for every checkpoint"
                )

    core = compare_checkpoints(labels, tokens, heads)
    checkpoints = []
    for k, entry in enumerate(core["checkpoints"]):  # type: ignore[arg-type]
        ck = checkpoint_of[k]
        checkpoints.append(
            {
                "index": k,
                "label": entry["label"],
                "checkpoint": ck.get("id") or ck.get("path"),
                "weights_sha1": ck.get("weights_sha1"),
                "anchors_run": str(anchors_runs[k]) if anchors_runs else None,
                "heads_run": str(heads_runs[k]) if heads_runs else None,
                "anchors": entry["anchors"],
                "heads": entry["heads"],
            }
        )
    rollouts = None
    if anchors_runs:
        params = manifests[0].get("parameters") or {}
        first = checkpoints[0]["anchors"]
        rollouts = {
            "data": params.get("data") or params.get("from_run"),
            "data_sha1": params.get("data_sha1"),
            "samples": first["samples"],
            "tokens": first["tokens"],
        }
    mme = None
    if heads_runs:
        report = loaded[0][1]
        mme = {
            "path": ((heads_manifests[0].get("mme") or {}).get("path")),
            "num_questions": report.get("num_questions"),
            "categories": report.get("categories"),
            "metric": heads[0].metric,  # type: ignore[index]
            "mode": heads[0].mode,  # type: ignore[index]
        }
    return {
        "kind": KIND,
        "rollouts": rollouts,
        "mme": mme,
        "checkpoints": checkpoints,
        "pairs": core["pairs"],
    }


@marks_failure
def run_checkpoint_compare(
    cfg: CheckpointCompareConfig,
    stage: Stage | None = None,
    log: Callable[[str], None] = lambda _msg: None,
) -> dict[str, Any]:
    """Run (or reuse) every checkpoint's sub-runs, compare them, write the result into cfg.out."""
    cfg.check()
    refuse_taken(cfg.out, cfg.resume)
    stage = stage or (lambda _name: nullcontext(None))
    if cfg.computes:
        run = Run.open(Path(cfg.out), COMMAND, cfg.parameters(), cfg.resume)
        anchors_runs, heads_runs = _run_subruns(cfg, stage, log)
        names = _labels([_short(c) for c in cfg.ckpts])
        result = compare_checkpoint_runs(anchors_runs, heads_runs, names)
    else:  # finished runs: refuse mismatched ones before anything is written
        result = compare_checkpoint_runs(cfg.anchors_runs, cfg.heads_runs)
        run = Run.open(Path(cfg.out), COMMAND, cfg.parameters(), cfg.resume)
    result["source"] = "checkpoints" if cfg.computes else "runs"
    write_checkpoints(run.path, result)
    run.finish(checkpoints=[c["label"] for c in result["checkpoints"]])
    return result
