"""The transformers versions kvmerge runs on (see ``pyproject.toml``), and how to pass them a cache.

transformers renamed the ``past_key_values`` argument of ``forward`` and ``generate`` to ``cache``
(the old name warns from 5.2x and goes in 5.40); :func:`with_cache` passes the cache under the
name the model's ``forward`` takes, so no kvmerge path warns on any supported version.
"""

from __future__ import annotations

import functools
import inspect

from transformers import PreTrainedModel
from transformers.cache_utils import Cache


@functools.cache
def cache_argument(model_class: type) -> str:
    """``"cache"`` if ``model_class.forward`` takes its cache by that name, else ``"past_key_values"``."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def with_cache(model: PreTrainedModel, cache: Cache | None) -> dict[str, Cache | None]:
    """``{name: cache}`` for ``model(...)`` and ``model.generate(...)``, e.g.
    ``model(ids, **with_cache(model, cache))``."""
    return {cache_argument(type(model)): cache}
