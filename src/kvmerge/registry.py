"""The method names: ``selector[+absorber]``, e.g. ``h2o``, ``streaming+cam``."""

from __future__ import annotations

import dataclasses

import torch

from kvmerge.absorbers.cam import CaM
from kvmerge.absorbers.kvmerger import KVMerger
from kvmerge.absorbers.less import LESS
from kvmerge.config import CompressionConfig
from kvmerge.method import Absorber, Method, Selector
from kvmerge.selectors.corm import CORM
from kvmerge.selectors.full import Full
from kvmerge.selectors.h2o import H2O
from kvmerge.selectors.knorm import KNorm
from kvmerge.selectors.random import Random
from kvmerge.selectors.scissorhands import Scissorhands
from kvmerge.selectors.snapkv import SnapKV
from kvmerge.selectors.streaming import Streaming
from kvmerge.selectors.tova import TOVA

SELECTORS: dict[str, type[Selector]] = {
    cls.name: cls for cls in (Full, Streaming, H2O, Scissorhands, TOVA, CORM, SnapKV, Random, KNorm)
}
ABSORBERS: dict[str, type[Absorber]] = {cls.name: cls for cls in (CaM, KVMerger, LESS)}
SHARED_OPTIONS = tuple(f.name for f in dataclasses.fields(CompressionConfig) if f.name != "budget")


def method_names() -> list[str]:
    """Every valid method string."""
    names = list(SELECTORS)
    names += [f"{s}+{a}" for s, cls in SELECTORS.items() if cls.compresses for a in ABSORBERS]
    return names


def describe_methods() -> dict[str, str]:
    """One line per method string."""
    lines = {name: cls.description for name, cls in SELECTORS.items()}
    for name in method_names():
        if "+" in name:
            selector, absorber = name.split("+")
            lines[name] = f"{SELECTORS[selector].description}; then {ABSORBERS[absorber].description}"
    return lines


def describe_parts() -> list[tuple[str, str, str, str]]:
    """(kind, name, description, own options with their defaults) of every selector and absorber."""
    return [("selector", name, cls.description, option_defaults(cls)) for name, cls in SELECTORS.items()] + [
        ("absorber", name, cls.description, option_defaults(cls)) for name, cls in ABSORBERS.items()
    ]


def method_options(cls: type) -> tuple[str, ...]:
    """The options a selector or absorber class takes (its dataclass fields)."""
    return tuple(f.name for f in _own_fields(cls))


def method_settings(method: str, options: dict | None = None) -> dict:
    """Every option of ``method``'s selector and absorber with the value it runs with (``options`` over
    the defaults), e.g. ``{"normalizer": "max", "max_over": "kept", ...}`` for ``h2o+cam``; results
    record it so that a default changed later cannot change what a stored number means."""
    selector_name, _, absorber_name = method.strip().lower().partition("+")
    parts = [cls for cls in (SELECTORS.get(selector_name), ABSORBERS.get(absorber_name)) if cls is not None]
    options = options or {}
    return {f.name: options.get(f.name, f.default) for cls in parts for f in _own_fields(cls)}


def draws_random(method: str, options: dict | None = None) -> bool:
    """Whether ``method`` with ``options`` draws random numbers, so that its seed changes its results
    (the random selector; CaM with its Bernoulli gate)."""
    selector_name, _, absorber_name = method.strip().lower().partition("+")
    selector, absorber = SELECTORS.get(selector_name), ABSORBERS.get(absorber_name)
    if selector is not None and selector.draws_random:
        return True
    if absorber is None or absorber.draws_random is Absorber.draws_random:  # never draws: no need to build it
        return False
    return absorber(**{k: v for k, v in (options or {}).items() if k in method_options(absorber)}).draws_random()


def option_defaults(cls: type) -> str:
    """``"name=default, ..."`` of a selector's or absorber's own options ("" for none)."""
    return ", ".join(f"{f.name}={f.default}" for f in _own_fields(cls))


def _own_fields(cls: type) -> tuple[dataclasses.Field, ...]:
    """The dataclass fields of a selector or absorber that are options (set at construction)."""
    return tuple(f for f in dataclasses.fields(cls) if f.init) if dataclasses.is_dataclass(cls) else ()


def build_method(name: str, config: CompressionConfig, **options) -> Method:
    """Parse ``selector[+absorber]``, give each part its own ``options`` and pair them with ``config``.

    Unknown names list the valid ones; impossible combinations say why.
    """
    if not isinstance(name, str):
        raise TypeError(f"method must be a string like 'h2o+cam', got {type(name).__name__}")
    selector_name, _, absorber_name = name.strip().lower().partition("+")
    if selector_name not in SELECTORS:
        valid = ", ".join(method_names())
        raise ValueError(f"unknown selector {selector_name!r} in method {name!r}; valid methods: {valid}")
    if absorber_name and absorber_name not in ABSORBERS:
        valid = ", ".join(ABSORBERS)
        raise ValueError(f"unknown absorber {absorber_name!r} in method {name!r}; valid absorbers: {valid}")
    selector_cls = SELECTORS[selector_name]
    absorber_cls = ABSORBERS.get(absorber_name)
    if absorber_cls and not selector_cls.compresses:
        raise ValueError(f"{name!r}: the {selector_name} selector never evicts, so there is nothing to {absorber_name}")
    if selector_cls.compresses and config.budget is None and not selector_cls.adaptive:
        raise ValueError(f"method {name!r} needs a budget: an int (tokens per head) or a float fraction in (0, 1]")
    if not selector_cls.compresses and config.budget is not None:
        raise ValueError(f"method {name!r} keeps every entry and takes no budget (got {config.budget!r})")
    for part, cls in ((selector_name, selector_cls), (absorber_name, absorber_cls)):
        if cls and cls.schedule and config.schedule != cls.schedule:
            raise ValueError(f"{part} works at prefill: pass schedule={cls.schedule!r} (got {config.schedule!r})")
    own = {cls: method_options(cls) for cls in (selector_cls, absorber_cls) if cls}
    unknown = sorted(set(options) - {option for names in own.values() for option in names})
    if unknown:
        mine = sorted({option for names in own.values() for option in names})
        raise TypeError(
            f"{name!r} takes no option(s) {', '.join(unknown)}; its own options: {', '.join(mine) or 'none'}"
        )
    selector = selector_cls(**{k: v for k, v in options.items() if k in own[selector_cls]})
    absorber = absorber_cls(**{k: v for k, v in options.items() if k in own[absorber_cls]}) if absorber_cls else None
    if selector.compresses and isinstance(config.budget, int):  # windows that cannot fit: say so now
        config.windows_for(torch.tensor([config.budget]), selector.default_sink, selector.default_recent)
    return Method(selector, absorber, config)


def options_for(method: str, options: dict) -> dict:
    """The part of ``options`` that ``method`` takes (shared options and its parts' own; none for ``full``),
    so one set of options, e.g. ``{"kernels": DIR, "merge_window": 32}``, can serve a list of methods."""
    selector_name, _, absorber_name = method.strip().lower().partition("+")
    selector, absorber = SELECTORS.get(selector_name), ABSORBERS.get(absorber_name)
    if selector is None or not selector.compresses:
        return {}
    taken = set(SHARED_OPTIONS) | set(method_options(selector)) | set(method_options(absorber) if absorber else ())
    return {k: v for k, v in options.items() if k in taken}


def make_method(name: str, budget: int | float | None = None, **options) -> Method:
    """Build a method from a flat set of options: those of :class:`CompressionConfig` configure the
    cache, the rest go to the selector and absorber that take them. Without a ``schedule`` option a
    method gets its own: ``"prefill"`` when a part works only there (SnapKV, KVMerger), else ``"step"``."""
    shared = {k: v for k, v in options.items() if k in SHARED_OPTIONS}
    own = {k: v for k, v in options.items() if k not in SHARED_OPTIONS}
    if "schedule" not in shared and isinstance(name, str):  # a prefill-only part (snapkv, kvmerger) sets it
        selector_name, _, absorber_name = name.strip().lower().partition("+")
        parts = (SELECTORS.get(selector_name), ABSORBERS.get(absorber_name))
        shared["schedule"] = next((cls.schedule for cls in parts if cls and cls.schedule), "step")
    try:
        return build_method(name, CompressionConfig(budget=budget, **shared), **own)
    except TypeError as error:
        if "takes no option" not in str(error):
            raise
        raise TypeError(f"{error}; options every method takes: {', '.join(SHARED_OPTIONS)}") from None
