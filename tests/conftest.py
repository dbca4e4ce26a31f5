"""Tiny randomly initialised models of every family kvmerge serves, and the real SmolLM2."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import (
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 97
# the device of tests/test_device.py: KVMERGE_TEST_DEVICE=cuda runs it on a GPU (skipped cleanly without one)
TEST_DEVICE = os.environ.get("KVMERGE_TEST_DEVICE", "cpu")


def tiny_model(family: str, layers: int = 2, seed: int = 0) -> PreTrainedModel:
    """A small random causal LM of ``family``; GQA (4 query / 2 KV heads) where the family has it."""
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=layers, max_position_embeddings=1024)
    if family == "llama":
        model = LlamaForCausalLM(
            LlamaConfig(**common, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2)
        )
    elif family == "mistral":
        config = MistralConfig(
            **common, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, sliding_window=None
        )
        model = MistralForCausalLM(config)
    elif family == "qwen2":
        model = Qwen2ForCausalLM(
            Qwen2Config(**common, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2)
        )
    elif family == "opt":
        config = OPTConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            num_hidden_layers=layers,
            ffn_dim=96,
            num_attention_heads=4,
            max_position_embeddings=1024,
            word_embed_proj_dim=64,
        )
        model = OPTForCausalLM(config)
    elif family == "gpt_neox":
        config = GPTNeoXConfig(**common, intermediate_size=96, num_attention_heads=4, rotary_pct=0.5)
        model = GPTNeoXForCausalLM(config)
    else:
        raise ValueError(family)
    return model.eval()


FAMILIES = ["llama", "mistral", "qwen2", "opt", "gpt_neox"]


@pytest.fixture(scope="session")
def llama() -> PreTrainedModel:
    return tiny_model("llama")


@pytest.fixture(scope="session")
def smollm2():
    import kvmerge

    return kvmerge.load_model("default")


@pytest.fixture(scope="session")
def device() -> torch.device:
    """``$KVMERGE_TEST_DEVICE`` (default ``cpu``); tests asking for it skip when it is not available."""
    device = torch.device(TEST_DEVICE)
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("KVMERGE_TEST_DEVICE=cuda but no CUDA device is available")
    return device


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny Llama checkpoint with a character tokenizer, as ``kvmerge.load_model`` reads it."""
    from tests.test_eval import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    """A short English text file."""
    from tests.test_eval import TEXT

    path = tmp_path_factory.mktemp("text") / "austen.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def random_less_kernels(
    directory: Path, layers: int, head_dim: int = 16, query_heads: int = 4, kv_heads: int = 2
) -> Path:
    """Untrained LESS kernels for a tiny model, saved to ``directory``; their scales set to 1 (not the
    training start's 1e-4) so that the state weighs as much as a kept entry."""
    from kvmerge.absorbers.less import LessKernels, save_kernels

    torch.manual_seed(0)
    kernels = torch.nn.ModuleList(LessKernels(head_dim, query_heads, kv_heads, hidden=8, rank=4) for _ in range(layers))
    for module in kernels:
        torch.nn.init.ones_(module.scale)
    meta = {"head_dim": head_dim, "query_heads": query_heads, "kv_heads": kv_heads, "hidden": 8, "rank": 4}
    return save_kernels(kernels, directory, meta)
