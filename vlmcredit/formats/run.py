"""Run directories: manifest, per-sample table, sharded tensors, atomic writes, resume.

Layout of a run (DESIGN.md):
    RUN/manifest.json      tool version, command, checkpoint id + weights hash, tokenizer hash,
                           every parameter and seed, created/finished times, status
    RUN/samples.parquet    one row per sample: id, the trainer's sample_id and completion_index,
                           source row, image refs, spans, shard, status
    RUN/shard-NNNNN.safetensors   tensors keyed "<sample id>/<name>"
    RUN/rank-R/                   a data-parallel run's rank R > 0 (docs/scale-out.md): its
                                  shard-NNNNN.safetensors, and its samples.parquet until rank 0
                                  merges it into RUN/samples.parquet (the shards stay, and the
                                  merged rows name them as rank-R/shard-NNNNN.safetensors)

Every file is written to a temporary name and renamed, so a killed run leaves either the old or
the new file, never half of one. A shard is written before the table that points at it; on
resume, shards no finished row points at are leftovers of the kill and are removed.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmcredit import __version__
from vlmcredit.errors import VlmCreditError
from vlmcredit.formats.files import (
    atomic_save_tensors,
    atomic_write_json,
    atomic_write_parquet,
    now,
)

MANIFEST = "manifest.json"
# What a failed run of ours may leave in its folder: removed when the corrected command starts
# over there (nothing else is ever deleted).
FAILED_RUN_LEFTOVERS = (
    "shard-*.safetensors",
    "samples.parquet",
    "predictions",
    "graphs",
    "*.parquet",
    "*.json",
    ".*.*",
    "rank-*",
)
# Runs opened in this process, so that a pipeline that raises can mark its run failed.
OPENED: list[Run] = []
SAMPLES = "samples.parquet"
RANK_DIR = "rank-{rank}"  # where a data-parallel run's rank > 0 writes (rank 0 writes RUN/)
SAMPLE_COLUMNS = [
    "id",
    "sample_id",  # the trainer's id (shared by a GRPO group); None in older runs = id
    "completion_index",  # index within the trainer's group, when the rollout gave one
    "row",
    "status",
    "error",
    "shard",
    "image_refs",
    "prompt_span",
    "response_span",
    "num_response_tokens",
    "num_image_tokens",
]


@dataclass
class Run:
    """A run directory being written (or resumed).

    In a data-parallel run (`pipelines/distributed.py`) every rank holds one: rank 0 writes the
    manifest and RUN/samples.parquet; rank R > 0 writes only into RUN/rank-R/ (its shards and its
    own rows table). `rows` is every row this process knows of: on rank R > 0 the first `base`
    rows are RUN/samples.parquet as it was when the rank joined, the rest its own commits.
    """

    path: Path
    manifest: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)
    rank: int = 0
    base: int = 0
    world: int = 1  # how many ranks share the batches (set when the run is opened for them)

    # -- creation / resume ----------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        path: Path,
        command: str,
        parameters: dict[str, Any],
        resume: bool,
        extra: dict[str, Any] | None = None,
    ) -> Run:
        """Start a new run in `path`, or resume it (`resume=True`) if its parameters match."""
        manifest_file = path / MANIFEST
        if path.exists() and not path.is_dir():
            raise VlmCreditError(f"--out {path}: is a file; choose a folder for the run")
        if manifest_file.exists() and _failed_elsewhere(path, command, parameters):
            _clear_failed_run(path)
        if manifest_file.exists():
            old = out_manifest(path)
            if not resume and old.get("status") != "failed":
                raise VlmCreditError(
                    f"--out {path}: already holds a run; pass --resume to continue it or choose "
                    "a new folder"
                )
            if old.get("command") != command or old.get("parameters") != _jsonable(parameters):
                changed = sorted(
                    k
                    for k in set(parameters) | set(old.get("parameters", {}))
                    if _jsonable(parameters).get(k) != old.get("parameters", {}).get(k)
                )
                raise VlmCreditError(
                    f"--out {path}: the run there was made with different parameters "
                    f"({', '.join(changed) or old.get('command')}); resume with the same options "
                    "or choose a new folder"
                )
            run = cls(path, old, _read_rows(path))
            run.merge_ranks()
            run._drop_orphan_shards()
            run.manifest.pop("error", None)
            run.manifest["status"] = "running"
            run.manifest.setdefault("resumed_at", []).append(now())
            run.write_manifest()
            OPENED.append(run)
            return run
        if path.exists() and any(path.iterdir()):
            raise VlmCreditError(f"--out {path}: exists and is not a run folder; choose a new one")
        path.mkdir(parents=True, exist_ok=True)
        manifest = {
            "tool": "vlmcredit",
            "version": __version__,
            "command": command,
            "argv": sys.argv,
            "parameters": _jsonable(parameters),
            "created": now(),
            "finished": None,
            "status": "running",
            **(extra or {}),
        }
        run = cls(path, manifest, [])
        run.write_manifest()
        OPENED.append(run)
        return run

    @classmethod
    def join(cls, path: Path, rank: int, world: int) -> Run:
        """Rank `rank` > 0 of a data-parallel run that rank 0 has just opened: reads the manifest
        and the rows so far, writes only into RUN/rank-R/ (never the manifest)."""
        if rank < 1:
            raise ValueError("Run.join is for ranks > 0; rank 0 opens the run")
        path = Path(path)
        rows = _read_rows(path)
        return cls(path, read_manifest(path), rows, rank=rank, base=len(rows), world=world)

    @classmethod
    def load(cls, path: Path) -> Run:
        """Open a finished (or partial) run for reading."""
        path = Path(path)
        return cls(path, read_manifest(path), _read_rows(path))

    # -- progress -------------------------------------------------------------------------------
    def done_ids(self) -> set[str]:
        return {r["id"] for r in self.rows if r["status"] in ("done", "bad")}

    @property
    def folder(self) -> str:
        """Where this process writes its shards and rows, relative to the run: "" (rank 0) or
        "rank-R/"."""
        return "" if self.rank == 0 else RANK_DIR.format(rank=self.rank) + "/"

    def next_shard_name(self) -> str:
        """The next free shard name of this rank, relative to the run folder."""
        used = [
            int(p.stem.split("-")[1]) for p in (self.path / self.folder).glob("shard-*.safetensors")
        ]
        return f"{self.folder}shard-{(max(used) + 1) if used else 0:05d}.safetensors"

    def commit(self, rows: Iterable[dict[str, Any]], tensors: dict[str, Any] | None = None) -> None:
        """Write a shard (if any tensors) and then the table that records its rows as done."""
        rows = list(rows)
        if tensors:
            shard = self.next_shard_name()
            atomic_save_tensors(self.path / shard, tensors)
            for row in rows:
                if row.get("status") == "done":
                    row["shard"] = shard
        self.rows.extend(rows)
        self.write_rows()

    def write_rows(self) -> None:
        """This process's rows table: RUN/samples.parquet, or RUN/rank-R/samples.parquet."""
        _write_table(self.path / self.folder / SAMPLES, self.rows[self.base :])

    def write_manifest(self) -> None:
        """Rank 0 (or the only process) writes the manifest; other ranks never do."""
        if self.rank == 0:
            atomic_write_json(self.path / MANIFEST, self.manifest)

    def merge_ranks(self) -> None:
        """Rank 0: fold the rows tables of ranks > 0 (RUN/rank-R/samples.parquet) into
        RUN/samples.parquet and remove them; their shards stay where the rows point.

        Only while no other rank writes (at open, and after the ranks' final barrier). The
        merged table is written before the rank tables go, so a kill in between leaves rows
        twice, and the next merge keeps the first of each id.
        """
        if self.rank != 0:
            raise ValueError("only rank 0 merges the ranks' tables")
        tables = sorted(self.path.glob(f"{RANK_DIR.format(rank='*')}/{SAMPLES}"))
        if not tables:
            return
        seen = {r["id"] for r in self.rows}
        for table in tables:
            for row in _read_rows(table.parent):
                if row["id"] not in seen:
                    seen.add(row["id"])
                    self.rows.append(row)
        self.write_rows()
        for table in tables:
            table.unlink()

    def order_rows(self, ids: Sequence[str]) -> None:
        """Rank 0: rows of `ids` in that order, after every row not among them (rows recorded
        before the batches, e.g. bad input rows), and rewrite the table if the order changed.
        A run whose batches were shared among ranks gets the table an unsplit run writes."""
        if self.rank != 0:
            raise ValueError("only rank 0 orders the run's table")
        position = {key: i for i, key in enumerate(ids)}
        ordered = sorted(self.rows, key=lambda r: (r["id"] in position, position.get(r["id"], 0)))
        if [r["id"] for r in ordered] != [r["id"] for r in self.rows]:
            self.rows = ordered
            self.write_rows()

    def finish(self, **summary: Any) -> None:
        self.manifest.update(summary)
        self.manifest["finished"] = now()
        self.manifest["status"] = "finished"
        self.write_manifest()

    def fail(self, error: str) -> None:
        """Mark the run failed: the same command continues it, a corrected one starts over."""
        self.manifest["status"] = "failed"
        self.manifest["error"] = error
        self.manifest["failed"] = now()
        self.write_manifest()

    def _drop_orphan_shards(self) -> None:
        referenced = {r["shard"] for r in self.rows if isinstance(r.get("shard"), str)}
        ranks = RANK_DIR.format(rank="*")
        for pattern in ("shard-*.safetensors", f"{ranks}/shard-*.safetensors"):
            for shard in self.path.glob(pattern):
                if shard.relative_to(self.path).as_posix() not in referenced:
                    shard.unlink()
        for pattern in (".*.*", f"{ranks}/.*.*"):
            for tmp in self.path.glob(pattern):
                tmp.unlink()

    # -- reading --------------------------------------------------------------------------------
    def shard_of(self, sample_id: str) -> str | None:
        """The shard file holding the sample's tensors, None when the run stored none for it."""
        # A row without tensors reads back with shard None or NaN (pandas), never a str.
        shard = next(
            (
                r["shard"]
                for r in self.rows
                if r["id"] == sample_id and isinstance(r.get("shard"), str)
            ),
            None,
        )
        return shard or None

    def tensors(self, sample_id: str, framework: str = "pt") -> dict[str, Any]:
        """All tensors stored for one sample, names without the id prefix.

        `framework="np"` gives numpy arrays without importing torch (the report reads so).
        """
        from safetensors import safe_open

        shard = self.shard_of(sample_id)
        if shard is None:
            raise VlmCreditError(f"{self.path}: no stored tensors for sample {sample_id!r}")
        file = self.path / shard
        if not file.is_file():
            raise VlmCreditError(
                f"{self.path}: missing {shard} (sample {sample_id!r}); rerun the command"
            )
        prefix = f"{sample_id}/"
        try:
            with safe_open(str(file), framework=framework) as f:
                return {
                    k[len(prefix) :]: f.get_tensor(k)
                    for k in f.keys()  # noqa: SIM118
                    if k.startswith(prefix)
                }
        except Exception as exc:  # safetensors raises its own error types for damaged files
            raise VlmCreditError(f"{file}: unreadable shard ({exc}); rerun the command") from None


def read_manifest(path: Path, advice: str = "rerun the command") -> dict[str, Any]:
    """manifest.json of a run (or export) folder, or a one-line error ending in `advice`."""
    file = Path(path) / MANIFEST
    if not file.is_file():
        raise VlmCreditError(f"{path}: not a run folder (no {MANIFEST})")
    try:
        manifest = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise VlmCreditError(f"{file}: unreadable ({exc}); {advice}") from None
    if not isinstance(manifest, dict):
        raise VlmCreditError(f"{file}: not a JSON object; {advice}")
    return manifest


def out_manifest(path: Path) -> dict[str, Any]:
    """The manifest of the run already in --out. A damaged one is not ours to judge or delete,
    and "rerun the command" would only meet "already holds a run" again: say what works."""
    return read_manifest(
        path,
        f"the run there cannot be continued; choose a new --out (or delete {path} to start over)",
    )


def _write_table(file: Path, rows: Sequence[dict[str, Any]]) -> None:
    import pandas as pd

    frame = pd.DataFrame(
        [{c: _cell(r.get(c)) for c in SAMPLE_COLUMNS} for r in rows],
        columns=SAMPLE_COLUMNS,
    )
    # nullable ints: an all-None or partly-None column would otherwise become float or object
    frame["completion_index"] = frame["completion_index"].astype("Int64")
    atomic_write_parquet(file, frame)


def _read_rows(path: Path) -> list[dict[str, Any]]:
    import pandas as pd

    file = path / SAMPLES
    if not file.exists():
        return []
    try:
        frame = pd.read_parquet(file)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise VlmCreditError(f"{file}: unreadable parquet ({exc}); rerun the command") from None
    rows = frame.to_dict("records")
    for row in rows:
        index = row.get("completion_index")
        if "completion_index" in row:
            row["completion_index"] = None if pd.isna(index) else int(index)
        for key in ("prompt_span", "response_span", "image_refs"):
            if row.get(key) is not None:
                row[key] = list(row[key])
    return rows


def row_sample_id(row: dict[str, Any]) -> str:
    """The trainer's id of a samples.parquet row (signals are keyed by it); runs written before
    the column existed, and bad rows, fall back to the row's own id."""
    value = row.get("sample_id")
    return value if isinstance(value, str) else str(row["id"])


def _cell(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    return value


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def _failed_elsewhere(path: Path, command: str, parameters: dict[str, Any]) -> bool:
    """A failed run of the same command there, made with other parameters (the user fixed an
    option or the data): it is replaced rather than blocking the corrected command."""
    try:
        old = read_manifest(path)
    except VlmCreditError:
        return False
    return (
        old.get("status") == "failed"
        and old.get("command") == command
        and old.get("parameters") != _jsonable(parameters)
    )


def _clear_failed_run(path: Path) -> None:
    """Remove what a failed run of ours wrote (its manifest says it is ours), nothing else."""
    import shutil

    for pattern in FAILED_RUN_LEFTOVERS:
        for item in path.glob(pattern):
            if item.is_dir():
                shutil.rmtree(item)
            else:
                item.unlink()
    (path / MANIFEST).unlink(missing_ok=True)
