"""The ``kvmerge`` attention implementation registered with transformers.

It hands the queries to the kvmerge cache layer whose ``update`` just ran (that layer runs
attention step by step and compresses between steps) and falls back to plain SDPA for any
other cache, so a model switched to it behaves as before with transformers' own caches.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from kvmerge.cache import take_pending_layer

NAME = "kvmerge"


def kvmerge_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention of ``query`` ``[batch, q_heads, q, head_dim]`` -> ``([batch, q, q_heads, head_dim], None)``.

    ``dropout`` sits where transformers' own attention functions have it (wrappers such as kvpress's
    pass it by position); kvmerge's layers run at inference and ignore it."""
    layer = take_pending_layer()
    if layer is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, **kwargs)
    return layer.attend(module, query, attention_mask, **kwargs), None


AttentionInterface.register(NAME, kvmerge_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)
