"""The method names: ``selector[+absorber]``, e.g. ``h2o``, ``streaming+cam``."""

from __future__ import annotations

from kvmerge.absorbers.cam import CaM
from kvmerge.config import CompressionConfig
from kvmerge.method import Absorber, Method, Selector
from kvmerge.selectors.full import Full
from kvmerge.selectors.h2o import H2O
from kvmerge.selectors.scissorhands import Scissorhands
from kvmerge.selectors.streaming import Streaming
from kvmerge.selectors.tova import TOVA

SELECTORS: dict[str, type[Selector]] = {cls.name: cls for cls in (Full, Streaming, H2O, Scissorhands, TOVA)}
ABSORBERS: dict[str, type[Absorber]] = {cls.name: cls for cls in (CaM,)}


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


def build_method(name: str, config: CompressionConfig) -> Method:
    """Parse ``selector[+absorber]`` and pair it with ``config``; unknown names list the valid ones."""
    if not isinstance(name, str):
        raise TypeError(f"method must be a string like 'h2o+cam', got {type(name).__name__}")
    selector_name, _, absorber_name = name.strip().lower().partition("+")
    if selector_name not in SELECTORS:
        raise ValueError(
            f"unknown selector {selector_name!r} in method {name!r}; valid methods: {', '.join(method_names())}"
        )
    if absorber_name and absorber_name not in ABSORBERS:
        raise ValueError(
            f"unknown absorber {absorber_name!r} in method {name!r}; valid absorbers: {', '.join(ABSORBERS)}"
        )
    selector = SELECTORS[selector_name]()
    if absorber_name and not selector.compresses:
        raise ValueError(f"{name!r}: the {selector_name} selector never evicts, so there is nothing to {absorber_name}")
    if selector.compresses and config.budget is None:
        raise ValueError(f"method {name!r} needs a budget: an int (tokens per head) or a float fraction in (0, 1]")
    absorber = ABSORBERS[absorber_name]() if absorber_name else None
    return Method(selector, absorber, config)
