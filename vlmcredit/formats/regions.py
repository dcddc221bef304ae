"""regions.parquet (SGUF key regions) and paragraphs.parquet (KAWHI paragraph weights): the one
writer and the one validating reader of each (docs/FORMATS.md, "regions run" and "KAWHI").

regions.parquet: one row per image-grid cell (= image token) of every image;
paragraphs.parquet: one row per response paragraph (segment) of every response.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from vlmcredit.errors import VlmCreditError
from vlmcredit.formats.files import atomic_write_parquet

REGIONS_PARQUET = "regions.parquet"
PARAGRAPHS_PARQUET = "paragraphs.parquet"
REGION_COLUMNS = {
    "sample_id": "string",
    "image": "int32",  # image index within the sample
    "cell": "int32",  # row-major cell index = image token index within the image
    "row": "int32",
    "col": "int32",
    "component": "int32",
    "energy": "float32",  # energy of the cell's component (Eq. 9)
    "key": "bool",  # component energy > tau
    "selected": "bool",  # kept by the run's selection
}
PARAGRAPH_COLUMNS = {
    "sample_id": "string",
    "response_id": "string",
    "paragraph": "int32",
    "text": "string",
    "num_tokens": "int32",
    "alpha": "float32",  # mean alignment over the paragraph's tokens (Eq. 14)
    "weight": "float32",  # w_j (Eq. 15, renormalized when the run asked)
}


def _frame(rows: dict[str, Any], columns: dict[str, str]) -> Any:
    import pandas as pd

    missing = [c for c in columns if c not in rows]
    if missing:  # a bug in whoever built the table
        raise ValueError(f"table lacks column(s) {missing}")
    return pd.DataFrame({c: pd.Series(rows[c]).astype(t) for c, t in columns.items()})


def write_regions(run_dir: Path, rows: dict[str, Any]) -> Path:
    """Write regions.parquet from column arrays (`REGION_COLUMNS`)."""
    path = Path(run_dir) / REGIONS_PARQUET
    atomic_write_parquet(path, _frame(rows, REGION_COLUMNS))
    return path


def write_paragraphs(folder: Path, rows: dict[str, Any]) -> Path:
    """Write paragraphs.parquet from column arrays (`PARAGRAPH_COLUMNS`)."""
    path = Path(folder) / PARAGRAPHS_PARQUET
    atomic_write_parquet(path, _frame(rows, PARAGRAPH_COLUMNS))
    return path


def _read(path: Path, columns: dict[str, str], hint: str) -> Any:
    import pyarrow.parquet as pq

    if not path.is_file():
        raise VlmCreditError(f"{path.parent}: missing {path.name}; {hint}")
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise VlmCreditError(f"{path}: unreadable parquet ({exc}); {hint}") from None
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise VlmCreditError(f"{path}: missing column(s) {', '.join(missing)}; {hint}")
    return table.to_pandas()


def read_regions(run_dir: Path) -> Any:
    """regions.parquet as a DataFrame, checked: cells of one image are numbered 0..n-1 and
    row/col agree with the cell index."""
    path = Path(run_dir) / REGIONS_PARQUET
    hint = "rerun vlmcredit regions"
    frame = _read(path, REGION_COLUMNS, hint)
    for (sid, image), group in frame.groupby(["sample_id", "image"], sort=False):
        cells = group["cell"].to_numpy()
        cols = int(group["col"].max()) + 1
        if not np.array_equal(cells, np.arange(len(cells))) or not np.array_equal(
            cells, group["row"].to_numpy() * cols + group["col"].to_numpy()
        ):
            raise VlmCreditError(
                f"{path}: sample {sid} image {image}: cells are not a row-major grid; {hint}"
            )
    return frame


def read_paragraphs(folder: Path) -> Any:
    """paragraphs.parquet as a DataFrame, checked: weights finite and >= 0."""
    path = Path(folder) / PARAGRAPHS_PARQUET
    hint = "rerun vlmcredit weights --method kawhi"
    frame = _read(path, PARAGRAPH_COLUMNS, hint)
    weight = frame["weight"].to_numpy()
    if not np.all(np.isfinite(weight)) or np.any(weight < 0):
        raise VlmCreditError(f"{path}: weights must be finite and >= 0; {hint}")
    return frame
