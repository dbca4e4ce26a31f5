"""Reading the local evaluation data (JSONL files under the data folder of :mod:`kvmerge.eval.data`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from kvmerge.eval.data import data_folder


def data_dir(override: str | os.PathLike | None = None) -> Path:
    """The data folder: ``override``, else :func:`~kvmerge.eval.data.default_data_dir`."""
    return data_folder(override)


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
