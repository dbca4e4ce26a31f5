"""Lets lm-eval's own command line see kvmerge: ``lm_eval --model kvmerge ... --tasks kvmerge_copa``.

lm-eval 0.4 discovers neither models nor tasks from other packages. :func:`install` writes a
``kvmerge-lm-eval.pth`` into site-packages that loads this file (by path, so Python's start-up
never imports torch or kvmerge) at interpreter start. It watches for two lm-eval modules and,
when they are imported:

- ``lm_eval.models``: registers the model ``kvmerge`` lazily (``kvmerge.eval.harness:KVMergeLM``);
- ``lm_eval.tasks.manager``: makes every ``TaskManager`` also index the ``kvmerge_*`` task folder.

Nothing else changes, and a process that never imports lm-eval pays one ``sys.meta_path`` entry.
``make install`` (and so ``make test``/``make demo``) runs :func:`install` in the project's ``.venv``.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import inspect
import sys
import sysconfig
from collections.abc import Callable
from pathlib import Path

TASKS_DIR = Path(__file__).resolve().with_name("tasks")
MODEL = ("kvmerge", "kvmerge.eval.harness:KVMergeLM")
PTH_NAME = "kvmerge-lm-eval.pth"


def _register_model(module) -> None:
    from lm_eval.api.registry import model_registry

    name, target = MODEL
    if name not in model_registry:
        model_registry.register(name, target=target)


def _include_kvmerge_tasks(module) -> None:
    manager = module.TaskManager
    original = manager.__init__
    if getattr(original, "_kvmerge", False):
        return
    signature = inspect.signature(original)

    def __init__(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        paths = bound.arguments.get("include_path") or []
        paths = list(paths) if isinstance(paths, (list, tuple)) else [paths]
        if TASKS_DIR not in {Path(p).resolve() for p in paths}:
            paths.append(TASKS_DIR)
        bound.arguments["include_path"] = paths
        original(*bound.args, **bound.kwargs)

    __init__._kvmerge = True
    manager.__init__ = __init__


AFTER_IMPORT: dict[str, Callable] = {"lm_eval.models": _register_model, "lm_eval.tasks.manager": _include_kvmerge_tasks}


class _Loader(importlib.abc.Loader):
    """Runs the real loader, then the module's after-import step."""

    def __init__(self, loader: importlib.abc.Loader, after: Callable) -> None:
        self.loader, self.after = loader, after

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        self.after(module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in AFTER_IMPORT:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader, AFTER_IMPORT[name])
        return spec


def activate() -> None:
    """Watch for lm-eval's modules in this process (what the ``.pth`` file runs at start-up)."""
    if not any(isinstance(finder, _Finder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
    for name, after in AFTER_IMPORT.items():  # already imported: apply now
        if name in sys.modules:
            after(sys.modules[name])


def install(site_packages: str | Path | None = None) -> Path:
    """Write the ``.pth`` file into ``site_packages`` (default: this interpreter's); returns its path."""
    target = Path(site_packages or sysconfig.get_paths()["purelib"]) / PTH_NAME
    here = str(Path(__file__).resolve())
    target.write_text(
        "import importlib.util as _u; _s = _u.spec_from_file_location('_kvmerge_lm_eval_hook', "
        f"{here!r}); _m = _u.module_from_spec(_s); _s.loader.exec_module(_m); _m.activate()\n"
    )
    return target


if __name__ == "__main__":
    print(f"wrote {install()}: lm_eval now knows --model kvmerge and the kvmerge_* tasks")
