"""The comparison folder of `vlmcredit compare`: manifest.json, compare.json, compare.parquet.

compare.json: {"runs": [...], "methods": [{"label", "method", "run", "signals",
"score_column", "responses"}], "pairs": [one object per pair, the columns below],
"anchors_in_vppo": [{"anchors", "vppo", "share", "anchors_selected", "both"}]}.
compare.parquet: one row per pair: a, b, responses, tokens, selected_a, selected_b, both,
jaccard, precision, recall, spearman (null when undefined), score_a, score_b.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vlmcredit import __version__
from vlmcredit.errors import VlmCreditError
from vlmcredit.formats.files import atomic_write_json, atomic_write_parquet, now
from vlmcredit.formats.run import MANIFEST

COMPARE_JSON = "compare.json"
COMPARE_PARQUET = "compare.parquet"
PAIR_COLUMNS = (
    "a", "b", "responses", "tokens", "selected_a", "selected_b", "both",
    "jaccard", "precision", "recall", "spearman", "score_a", "score_b",
)  # fmt: skip


def write_compare(folder: Path, result: dict[str, Any], command: list[str] | None = None) -> None:
    """Write the comparison (tables first, manifest last: a folder with a manifest is whole)."""
    import pandas as pd

    folder = Path(folder)
    if (folder / COMPARE_JSON).exists() or (folder / MANIFEST).exists():
        raise VlmCreditError(f"--out {folder}: already holds a run; choose a new folder")
    folder.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(
        [{c: pair.get(c) for c in PAIR_COLUMNS} for pair in result["pairs"]],
        columns=list(PAIR_COLUMNS),
    )
    atomic_write_parquet(folder / COMPARE_PARQUET, frame)
    atomic_write_json(folder / COMPARE_JSON, result)
    manifest = {
        "command": "compare",
        "tool_version": __version__,
        "command_line": command or [],
        "runs": [m["run"] for m in result["methods"]],
        "created": now(),
    }
    atomic_write_json(folder / MANIFEST, manifest)


def read_compare(folder: Path) -> dict[str, Any]:
    """compare.json of a comparison folder, checked, or a one-line error."""
    file = Path(folder) / COMPARE_JSON
    try:
        result = json.loads(file.read_text())
    except FileNotFoundError:
        raise VlmCreditError(f"{folder}: no {COMPARE_JSON}; run vlmcredit compare") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise VlmCreditError(f"{file}: unreadable ({exc}); rerun vlmcredit compare") from None
    if not isinstance(result, dict) or not isinstance(result.get("pairs"), list):
        raise VlmCreditError(f"{file}: not a comparison (no pairs); rerun vlmcredit compare")
    for pair in result["pairs"]:
        missing = [c for c in ("a", "b", "jaccard") if c not in pair]
        if missing:
            raise VlmCreditError(f"{file}: a pair lacks {', '.join(missing)}; rerun compare")
    return result
