"""lm-evaluation-harness integration: the ``kvmerge`` model and the ``kvmerge_*`` tasks.

lm-eval (0.4.x) has no plugin mechanism for models: a model class must be registered in its
registry by importing the module that defines it. :func:`main` (console script
``kvmerge-lm-eval``, or ``python -m kvmerge.eval.harness``) registers :class:`KVMergeLM` as
``kvmerge``, adds this package's task folder to ``--include_path`` and runs lm-eval's own CLI
with the same arguments::

    kvmerge-lm-eval --model kvmerge --model_args pretrained=default,method=h2o+cam,budget=0.2,seed=0 \\
        --tasks kvmerge_copa --limit 40

Teacher-forced scoring follows the papers' protocol (METHODS.md, "Budgets"): each request
``context + continuation`` goes through a fresh compressed cache in one forward call, processed in
steps of ``chunk`` tokens (1 = token by token, causal eviction), and a float budget is a fraction
of that whole sequence's length.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import model_registry
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

import kvmerge
from kvmerge.absorbers.less import with_kernels
from kvmerge.compat import with_cache
from kvmerge.eval.perplexity import require_step_schedule
from kvmerge.models import model_label

MODEL_NAME = "kvmerge"
TASKS_DIR = Path(__file__).with_name("tasks")
QA_TASKS = (
    "kvmerge_openbookqa",
    "kvmerge_piqa",
    "kvmerge_winogrande",
    "kvmerge_copa",
    "kvmerge_rte",
    "kvmerge_mathqa",
)
_Request = tuple[tuple[str, str], list[int], list[int]]


class KVMergeLM(TemplateLM):
    """An lm-eval model whose every forward pass runs through a fresh kvmerge cache.

    Parameters
    ----------
    pretrained
        ``"default"`` (SmolLM2-135M-Instruct), a local path or a hub id (see :func:`kvmerge.load_model`),
        or an already loaded model (then pass ``tokenizer`` too).
    tokenizer
        The tokenizer of an already loaded ``pretrained`` model.
    method
        ``selector[+absorber]`` (:func:`kvmerge.method_names`).
    budget
        Entries per KV head (int) or fraction of each scored sequence (float); ignored by ``full``.
    seed
        Seeds CaM's Bernoulli gate.
    chunk
        Tokens per compression step inside a forward call (1 = token by token).
    batch_size
        Sequences per forward call (left-padded). ``"auto"`` is taken as 8.
    max_length
        Longest sequence scored (left-truncated); default the model's ``max_position_embeddings``.
    max_gen_toks
        Default ``max_new_tokens`` for ``generate_until``.
    device, dtype
        Where and in which precision the model runs; under ``accelerate launch`` each process takes
        its own device and a shard of the requests (data parallel).
    progress
        Show this model's progress bars (``False``: none, whatever lm-eval asks).
    **options
        Other :func:`kvmerge.make_cache` options (``sink``, ``recent``, ``merge_window``, ...).
    """

    def __init__(
        self,
        pretrained: str | PreTrainedModel = "default",
        tokenizer: PreTrainedTokenizerBase | None = None,
        method: str = "full",
        budget: int | float | None = None,
        seed: int = 0,
        chunk: int = 1,
        batch_size: int | str = 8,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        device: str | None = None,
        dtype: str = "float32",
        max_batch_size: int | None = None,
        progress: bool = True,
        **options,
    ) -> None:
        super().__init__()
        self._rank, self._world_size, self.accelerator = 0, 1, None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from accelerate import Accelerator

            # on a CPU, accelerate joins the processes (torchrun's) only when told: gloo, one shard each
            self.accelerator = Accelerator(cpu=not torch.cuda.is_available() or str(device).startswith("cpu"))
            self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes
            device = str(self.accelerator.device)
        if not device or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            device = "cuda" if torch.cuda.is_available() else "cpu"  # lm-eval's CLI asks for cuda by default
        self._device = torch.device(device)
        full = method == "full"  # keeps everything: steps change nothing, so one step is exact and fastest
        self.cache_options = {
            "budget": None if full else budget,
            "seed": seed,
            "chunk_size": 1 << 30 if full else chunk,
        }
        self.cache_options.update(options)
        label = pretrained.config._name_or_path if isinstance(pretrained, PreTrainedModel) else model_label(pretrained)
        self.cache_options = with_kernels(method, budget, label, self.cache_options)
        method_ = kvmerge.make_method(method, **self.cache_options)  # bad arguments fail before the model loads
        if isinstance(pretrained, PreTrainedModel):
            self.model, self.tokenizer = pretrained, tokenizer
        else:
            self.model, self.tokenizer = kvmerge.load_model(str(pretrained), dtype=getattr(torch, dtype))
        self.model.to(self._device)
        self.method = method
        kvmerge.make_cache(self.model, method, **self.cache_options)  # and the model is one kvmerge serves
        self.teacher_forced_error = None  # loglikelihood needs the step schedule; generation takes any
        try:
            require_step_schedule(method_)
        except ValueError as error:
            self.teacher_forced_error = error
        self.sink = method_.selector.default_sink if method_.config.sink is None else method_.config.sink
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        self.max_length = max_length or self.model.config.get_text_config().max_position_embeddings
        self.max_gen_toks = max_gen_toks
        self.progress = progress

    # -- what TemplateLM needs -------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.eot_token_id

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    # -- data parallel (accelerate launch) -------------------------------------------------------

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.accelerator.gather(tensor) if self.accelerator else tensor

    def gather_object(self, obj, dst: int = 0):
        if not self.accelerator:
            return [obj]
        from accelerate.utils import gather_object

        return gather_object([obj])

    def barrier(self) -> None:
        if self.accelerator:
            self.accelerator.wait_for_everyone()

    # -- scoring ---------------------------------------------------------------------------------

    def new_cache(self, **overrides) -> kvmerge.KVMergeCache:
        """A fresh cache with this model's method and options (``overrides`` replace some)."""
        return kvmerge.make_cache(self.model, self.method, **(self.cache_options | overrides))

    def cache_overrides(self, length: int) -> dict:
        """Options for a sequence of ``length`` tokens whose float budget is smaller than the method's sinks
        (e.g. 20% of a 10-token COPA choice < StreamingLLM's 4 sinks): the sinks then shrink to the budget."""
        budget = self.cache_options["budget"]
        tokens = math.ceil(budget * length) if isinstance(budget, float) else self.sink
        return {"sink": tokens} if tokens < self.sink else {}

    @torch.no_grad()
    def token_logprobs(
        self, sequences: list[list[int]], scored: int | None = None, **overrides
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Log-probability of the last ``scored`` tokens of each sequence given the ones before them, through
        one fresh cache per batch (only those positions go through the output layer).

        Parameters
        ----------
        sequences
            Token ids, each ``[n_i]`` with ``n_i > scored``; scored as one left-padded batch.
        scored
            Tokens scored at the end of each sequence; ``None``: all but the first of the longest.
        **overrides
            Cache options that replace this model's (see :meth:`cache_overrides`).

        Returns
        -------
        list of (torch.Tensor, torch.Tensor)
            Per sequence, ``[k_i]`` float32 ``log p(x_t | x_<t)`` for its last ``k_i = min(scored, n_i - 1)``
            tokens and ``[k_i]`` bool: whether ``x_t`` is the most likely token there.
        """
        if self.teacher_forced_error is not None:
            raise self.teacher_forced_error
        longest = max(map(len, sequences))
        scored = longest - 1 if scored is None else scored
        ids = torch.full((len(sequences), longest), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, sequence in enumerate(sequences):
            ids[row, longest - len(sequence) :] = torch.tensor(sequence)
            mask[row, longest - len(sequence) :] = 1
        ids, mask = ids.to(self._device), mask.to(self._device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = self.model(
            ids,
            attention_mask=mask,
            position_ids=positions,
            **with_cache(self.model, self.new_cache(**overrides)),
            use_cache=True,
            logits_to_keep=scored + 1,
        ).logits[:, :-1]
        logprobs = F.log_softmax(logits.float(), dim=-1)
        targets = ids[:, -scored:, None]
        picked = logprobs.gather(-1, targets)[..., 0].cpu()
        greedy = (logprobs.argmax(-1) == targets[..., 0]).cpu()
        return [(picked[row, -(len(s) - 1) :], greedy[row, -(len(s) - 1) :]) for row, s in enumerate(sequences)]

    def _no_bar(self, disable_tqdm: bool) -> bool:
        """Whether to hide a progress bar: lm-eval asks to, another process shows it, or ``progress=False``."""
        return disable_tqdm or bool(self.rank) or not self.progress

    def _loglikelihood_tokens(self, requests: list[_Request], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """Sum of log-probabilities of each continuation and whether it is the greedy one.

        The whole ``context + continuation`` (left-truncated to ``max_length``) is one forward call,
        so a float budget is a fraction of it. Requests are scored longest first in batches.
        """
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        sequences = [(context + continuation)[-self.max_length :] for _, context, continuation in requests]
        overrides = [self.cache_overrides(len(sequence)) for sequence in sequences]
        # batches share their cache options; longest first
        order = sorted(range(len(requests)), key=lambda i: (sorted(overrides[i].items()), -len(sequences[i])))
        batches = [
            same[start : start + self.batch_size]
            for same in (list(g) for _, g in itertools.groupby(order, key=lambda i: overrides[i]))
            for start in range(0, len(same), self.batch_size)
        ]
        bar = tqdm(
            total=len(requests),
            desc=f"loglikelihood ({self.method})",
            disable=disable_tqdm or self.rank or not self.progress,
        )
        for batch in batches:
            scored = max(len(requests[i][2]) for i in batch)
            scores = self.token_logprobs([sequences[i] for i in batch], scored, **overrides[batch[0]])
            for i, (logprobs, greedy) in zip(batch, scores, strict=True):
                n = len(requests[i][2])
                results[i] = (float(logprobs[-n:].sum()), bool(greedy[-n:].all()))
                bar.update(1)
        bar.close()
        return results

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts, each scored as one sequence (prefixed by ``prefix_token_id``)
        through a fresh cache, left-truncated to ``max_length``."""
        sequences = [[self.prefix_token_id, *self.tok_encode(req.args[0])][-self.max_length :] for req in requests]
        out = []
        for start in tqdm(
            range(0, len(sequences), self.batch_size), disable=disable_tqdm or not self.progress, desc="rolling"
        ):
            out.extend(float(lp.sum()) for lp, _ in self.token_logprobs(sequences[start : start + self.batch_size]))
        return out

    @torch.no_grad()
    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Greedy generation through a fresh cache per request (budget fraction = of the prompt),
        cut at the first stop string."""
        out = []
        for request in tqdm(
            requests, desc=f"generate ({self.method})", disable=disable_tqdm or self.rank or not self.progress
        ):
            context, gen_kwargs = request.args
            gen_kwargs = dict(gen_kwargs)
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = gen_kwargs.pop("max_gen_toks", self.max_gen_toks)
            ids = torch.tensor([self.tok_encode(context)[-(self.max_length - max_new) :]], device=self._device)
            generated = self.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                **with_cache(self.model, self.new_cache()),
                max_new_tokens=max_new,
                do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id,
                stop_strings=until or None,
                tokenizer=self.tokenizer,
            )
            text = self.tokenizer.decode(generated[0, ids.shape[1] :], skip_special_tokens=True)
            for stop in until:
                text = text.split(stop)[0]
            out.append(text)
        return out


def register() -> type[KVMergeLM]:
    """Register :class:`KVMergeLM` as lm-eval model ``kvmerge`` (idempotent); returns the class."""
    import lm_eval.models  # noqa: F401  (registers lm-eval's own models first: the registry is filled lazily)

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME)(KVMergeLM)
    return KVMergeLM


@contextlib.contextmanager
def quiet_git() -> Iterator[None]:
    """Let lm-eval record the git commit of the working directory without printing git's
    ``fatal: not a git repository`` when there is none (outside a checkout)."""
    import lm_eval.evaluator

    def commit() -> str | None:
        try:
            described = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, check=True)
        except (OSError, subprocess.CalledProcessError):
            return None
        return described.stdout.strip()

    recorded = lm_eval.evaluator.get_git_commit_hash
    lm_eval.evaluator.get_git_commit_hash = commit
    try:
        yield
    finally:
        lm_eval.evaluator.get_git_commit_hash = recorded


def task_manager(data_dir: str | os.PathLike | None = None, include_defaults: bool = True):
    """An lm-eval ``TaskManager`` that knows the ``kvmerge_*`` tasks; ``data_dir`` overrides ``$KVMERGE_DATA``.

    ``include_defaults=False`` leaves out lm-eval's own tasks (indexing them takes seconds).
    """
    from lm_eval.tasks import TaskManager

    if data_dir is not None:
        os.environ["KVMERGE_DATA"] = str(Path(data_dir).resolve())
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=include_defaults)


def main(argv: list[str] | None = None) -> None:
    """lm-eval's CLI with the ``kvmerge`` model registered and the ``kvmerge_*`` tasks included."""
    from lm_eval.__main__ import cli_evaluate

    register()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not {"-h", "--help"} & set(argv) and not any(arg.startswith("--include_path") for arg in argv):
        argv += ["--include_path", str(TASKS_DIR)]
    sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
