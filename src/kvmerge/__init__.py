"""kvmerge: bound the KV cache of any transformers causal LM by evicting and merging entries."""

from __future__ import annotations

from transformers import PreTrainedModel

from kvmerge import attention
from kvmerge.absorbers.less import with_kernels
from kvmerge.cache import KVMergeCache
from kvmerge.compat import with_cache
from kvmerge.config import CompressionConfig
from kvmerge.models import check_model, load_model
from kvmerge.positions import KeyRotation
from kvmerge.registry import describe_methods, make_method, method_names

__all__ = [
    "CompressionConfig",
    "KVMergeCache",
    "describe_methods",
    "load_model",
    "make_cache",
    "make_method",
    "method_names",
    "with_cache",
]
__version__ = "0.1.0"


def make_cache(
    model: PreTrainedModel,
    method: str = "full",
    budget: int | float | None = None,
    *,
    record_evictions: bool = False,
    **options,
) -> KVMergeCache:
    """A transformers ``Cache`` for ``model`` bounded by ``method`` (``selector[+absorber]``).

    ``budget`` is entries kept per KV head (int) or a fraction of the prompt (float in (0, 1]);
    ``options`` are the other :class:`CompressionConfig` fields (``sink``, ``recent``,
    ``schedule``, ``chunk_size``, ``decode_interval``, ``merge_window``, ``history_window``,
    ``position_shift``, ``gqa``, ``seed``) or the method's own (``corm``'s ``window``, ...).
    Everything is validated before any compute. Switches the model to the ``kvmerge`` attention
    implementation (SDPA underneath), which leaves other caches unchanged. ``record_evictions``
    keeps, per layer, when each position was evicted (``layer.evicted_at``; for analysis and training).
    ``+less`` without ``kernels=`` reads the kernels ``kvmerge train-less`` made for this model,
    selector and budget.
    """
    if isinstance(method, str) and isinstance(model, PreTrainedModel):
        options = with_kernels(method, budget, model.config._name_or_path, options)
    built = make_method(method, budget, **options)
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    check_model(model)
    key_rotation = KeyRotation.from_model(model) if built.config.position_shift else None
    if model.config._attn_implementation != attention.NAME:
        model.set_attn_implementation(attention.NAME)
    layers = model.config.get_text_config(decoder=True).num_hidden_layers
    return KVMergeCache(built, layers, key_rotation, record_evictions)
