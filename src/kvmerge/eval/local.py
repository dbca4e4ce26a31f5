"""Reading the local evaluation data (JSONL files under the data folder of :mod:`kvmerge.eval.data`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from kvmerge.eval.data import default_data_dir


def data_dir(override: str | os.PathLike | None = None) -> Path:
    """The data folder: ``override``, else ``$KVMERGE_DATA``, else ``../shared/data`` relative to the cwd."""
    path = Path(override) if override else default_data_dir()
    if path is None or not path.is_dir():
        raise FileNotFoundError(
            f"data folder {path or '../shared/data'} not found: set $KVMERGE_DATA or pass a data directory"
        )
    return path


def read_jsonl(path: str | os.PathLike, limit: int | None = None) -> list[dict]:
    """The first ``limit`` (all if ``None``) records of a JSONL file."""
    records = []
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            if limit is not None and len(records) >= limit:
                break
            if line.strip():
                records.append(json.loads(line))
    return records
