"""The ``kvmerge`` command: list methods, generate text, answer questions about a compressed context, measure
streaming perplexity, run the demo."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NoReturn

import torch
import transformers

import kvmerge
from kvmerge.cli_help import (
    EPILOG_ASK,
    EPILOG_CALIBRATE,
    EPILOG_DEMO,
    EPILOG_GENERATE,
    EPILOG_MAIN,
    EPILOG_METHODS,
    EPILOG_PPL,
    EPILOG_TRAIN_LESS,
)
from kvmerge.compat import with_cache


class UsageError(Exception):
    """A user error: reported as one ``kvmerge: error: ...`` line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, no usage block: see --help
        raise UsageError(f"{message} (see '{self.prog} --help')")


def parse_budget(text: str) -> int | float:
    """``"256"`` -> 256 entries per head; ``"0.2"`` or ``"20%"`` -> the fraction 0.2 (as ``make_cache`` reads it)."""
    try:
        return kvmerge.config.parse_budget(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid count {text!r}: expected a positive integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid count {text!r}: expected a positive integer")
    return value


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """Turn the library's validation errors (raised before any compute) into :class:`UsageError`."""
    try:
        yield
    except (ValueError, TypeError, OSError) as error:
        raise UsageError(" ".join(str(error).split())) from error


def _run_options(args: argparse.Namespace) -> dict:
    """The ``make_cache`` options of a generate/ask run: its seed, ``--chunk`` and every ``--option``."""
    return {"seed": args.seed} | ({"chunk_size": args.chunk} if args.chunk else {}) | dict(args.options)


def _check_method(method: str, budget: int | float | None, model: str = "default", **options) -> None:
    """Validate a method and its budget before loading ``model`` (``+less``: its kernels are there)."""
    from kvmerge.absorbers.less import with_kernels
    from kvmerge.models import model_label

    kvmerge.make_method(method, budget, **with_kernels(method, budget, model_label(model), options))


def _model_name(name: str) -> str:
    """``name`` for :func:`kvmerge.load_model`, checked first (:func:`kvmerge.models.model_source`)."""
    from kvmerge.models import model_source

    return model_source(name)


def _cmd_methods(args: argparse.Namespace) -> int:
    from kvmerge.eval.report import format_table
    from kvmerge.registry import SHARED_OPTIONS, describe_parts

    described = kvmerge.describe_methods()
    print(format_table([[name, text] for name, text in described.items()], ["method", "description"]))
    parts = [[kind, name, options] for kind, name, _, options in describe_parts() if options]
    print("\n" + format_table(parts, ["part", "name", "its own options, with their defaults"]))
    print("\noptions every method takes: " + ", ".join(SHARED_OPTIONS))
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from transformers import TextStreamer

    options = _run_options(args)
    if not args.prompt.strip():
        raise UsageError('the prompt is empty: give the text to answer or continue, e.g. "Tell me a story."')
    with _user_errors():
        _check_method(args.method, args.budget, args.model, **options)
        model, tokenizer = kvmerge.load_model(_model_name(args.model))
        if tokenizer.chat_template and not args.raw:
            messages = [{"role": "user", "content": args.prompt}]
            prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            inputs = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
        else:
            inputs = tokenizer(args.prompt, return_tensors="pt")
        cache = kvmerge.make_cache(model, args.method, budget=args.budget, **options)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    start = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(
            **inputs.to(model.device),
            **with_cache(model, cache),
            max_new_tokens=args.max_new_tokens,
            do_sample=False,
            streamer=streamer,
            pad_token_id=tokenizer.pad_token_id,
        )
    seconds = time.perf_counter() - start
    new_tokens = output.shape[1] - inputs.input_ids.shape[1]
    held, full = cache.kv_bytes(), cache.kv_bytes_full()
    print(
        f"kvmerge: {args.method}{'' if args.budget is None else f', budget {args.budget}'}: "
        f"{new_tokens} new tokens in {seconds:.1f} s; "
        f"{cache.kept_tokens()} entries kept per head of {cache.get_seq_length()} tokens seen; "
        f"KV {held / 2**20:.2f} MiB vs {full / 2**20:.2f} MiB full ({100 * held / max(full, 1):.0f}%)",
        file=sys.stderr,
    )
    return 0


def _cmd_ask(args: argparse.Namespace) -> int:
    from kvmerge.pipeline import answer_file

    options = _run_options(args)
    with _user_errors():
        _check_method(args.method, args.budget, args.model, **options)
        run = answer_file(args.context, args.question, args.method, args.budget, _model_name(args.model), options)
    summary = run(args.max_new_tokens, args.batch_size, chat=not args.raw)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    for pair in summary["answers"]:
        print(f"Q: {pair['question']}\nA: {pair['answer']}\n")
    print(
        f"kvmerge: {args.method}: context of {summary['context_tokens']} tokens compressed to "
        f"{summary['kept_per_head']} entries per head in {summary['compress_seconds']:.1f} s (KV "
        f"{summary['kv_bytes'] / 2**20:.2f} MiB vs {summary['kv_bytes_full'] / 2**20:.2f} MiB full); "
        f"{len(summary['answers'])} answers in {summary['answer_seconds']:.1f} s",
        file=sys.stderr,
    )
    return 0


def _cmd_ppl(args: argparse.Namespace) -> int:
    from kvmerge.eval import load_text, prepare_perplexity
    from kvmerge.eval.report import results_table

    with _user_errors():
        options = dict(args.options)
        _check_method(args.method, args.budget, args.model, chunk_size=args.chunk, seed=args.seed, **options)
        text = load_text(args.data, args.data_dir)
        model, tokenizer = kvmerge.load_model(_model_name(args.model))
        run = prepare_perplexity(
            model, tokenizer, text, args.method, args.budget, tokens=args.tokens, chunk=args.chunk, seed=args.seed,
            **options,
        )  # fmt: skip
    result = {**run.run(progress=not args.no_progress), "data": args.data}
    print(json.dumps(result) if args.json else results_table([result]))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from kvmerge.eval.demo import prepare_demo
    from kvmerge.eval.report import results_table
    from kvmerge.eval.results import claim_out_dir

    with _user_errors():
        methods = args.methods.split(",")
        for method in methods:
            _check_method(method, None if method == "full" else args.budget, args.model)
        model = _model_name(args.model)
        claim_out_dir(args.out, args.force)
        demo = prepare_demo(
            args.out, tokens=args.tokens, budget=args.budget, model=model, methods=methods, seed=args.seed
        )
    start = time.perf_counter()
    record = demo.run(progress=not args.no_progress)
    print(results_table(record["results"], budget=False))
    print(
        f"{time.perf_counter() - start:.0f} s; wrote {demo.out / 'results.json'} and {demo.out / 'ppl_memory.png'}",
        file=sys.stderr,
    )
    return 0


def _cmd_train_less(args: argparse.Namespace) -> int:
    from kvmerge.absorbers.less import kernel_dir
    from kvmerge.eval.results import claim_out_dir, line_plot
    from kvmerge.models import model_label
    from kvmerge.training import PROGRESS_FILE, less_training_text, train_less

    with _user_errors():
        if "+" in args.method:
            raise ValueError(f"train-less takes a selector (h2o, streaming, ...), got {args.method!r}")
        _check_method(args.method, args.budget)
        text = less_training_text(args.data_dir)
        name = _model_name(args.model)
        directory = args.out or kernel_dir(model_label(name), args.method, args.budget)
        if not (directory / PROGRESS_FILE).exists() or args.force:  # an unfinished run continues
            claim_out_dir(directory, args.force)
            (directory / PROGRESS_FILE).unlink(missing_ok=True)
        model, tokenizer = kvmerge.load_model(name)
    needed = args.sequences * args.tokens
    ids = tokenizer(text[: 16 * needed], return_tensors="pt").input_ids[0]  # 16 characters a token is ample
    with _user_errors():
        result = train_less(
            model, ids, args.method, args.budget, directory=directory, sequences=args.sequences,
            tokens=args.tokens, epochs=args.epochs, learning_rate=args.learning_rate, seed=args.seed,
            progress=not args.no_progress,
        )  # fmt: skip
    curve = [
        {"layer": f"layer {i}", "step": step + 1, "loss": loss}
        for i, losses in enumerate(result.losses)
        if i % max(1, len(result.losses) // 6) == 0
        for step, loss in enumerate(losses)
    ]
    line_plot(curve, "step", "loss", "layer", directory / "loss.png", "LESS kernel training", "Adam step", "MSE", True)
    meta = json.loads((directory / "config.json").read_text())
    first, last = (sum(meta[key]) / len(meta[key]) for key in ("loss_first_epoch", "loss_last_epoch"))
    print(f"trained {len(result.losses)} layers in {result.seconds:.0f} s; mean loss {first:.4g} -> {last:.4g} "
          "(first -> last epoch)")  # fmt: skip
    print(f"kernels: {directory}  (make_cache(model, '{args.method}+less', {args.budget}) finds them there)")
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from kvmerge.training import calibrate_kvmerger, less_training_text

    with _user_errors():
        if not 0.0 < args.target < 1.0:
            raise ValueError(f"--target is the fraction of entries to keep, in (0, 1); got {args.target}")
        text = less_training_text(args.data_dir)
        model, tokenizer = kvmerge.load_model(_model_name(args.model))
    ids = tokenizer(text[: 16 * args.tokens], return_tensors="pt").input_ids[:, : args.tokens]
    threshold, tried = calibrate_kvmerger(model, ids, args.target)
    from kvmerge.eval.report import format_table

    rows = [[f"{t:+.4f}", f"{f:.3f}"] for t, f in sorted(tried.items())]
    print(format_table(rows, ["similarity", "entries kept"]))
    print(f"similarity={threshold:.4f} keeps {tried[threshold]:.3f} of the entries (target {args.target})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``kvmerge`` argument parser."""
    from kvmerge.eval.bench import add_bench_command
    from kvmerge.eval.commands import add_eval_commands
    from kvmerge.eval.commands import parse_option as option
    from kvmerge.eval.data import DATA_DIR_HELP, SOURCES
    from kvmerge.eval.demo import DEMO_METHODS

    formatter = argparse.RawDescriptionHelpFormatter
    parser = _Parser(
        prog="kvmerge",
        description="Bound the KV cache of a transformers causal LM by evicting and merging entries (CaM).",
        epilog=EPILOG_MAIN,
        formatter_class=formatter,
    )
    parser.add_argument("--version", action="version", version=f"kvmerge {kvmerge.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, summary: str, epilog: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=summary, description=summary, epilog=epilog, formatter_class=formatter)

    def method_options(sub: argparse.ArgumentParser, chunk_default: int | None, chunk_help: str) -> None:
        sub.add_argument("--method", required=True, help="selector[+absorber], e.g. h2o+cam (see 'kvmerge methods')")
        sub.add_argument(
            "--budget",
            type=parse_budget,
            help="entries kept per KV head: an int (256) or a fraction in (0, 1] (0.2 or 20%%); not for full",
        )
        sub.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct), a local path or hub id")
        sub.add_argument("--chunk", type=positive_int, default=chunk_default, help=chunk_help)
        sub.add_argument("--seed", type=int, default=0, help="seed of the method's random choices (default 0)")
        sub.add_argument(
            "--option", dest="options", type=option, action="append", default=[], metavar="KEY=VALUE",
            help="a method option (repeatable): kernels=DIR (+less), merge_window=32, ... (see 'kvmerge methods')",
        )  # fmt: skip

    def threads_option(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--threads",
            type=positive_int,
            default=1,
            help="torch CPU threads (default 1: token-by-token steps are tiny, and more threads only add overhead)",
        )

    sub = command("methods", "list the method strings with a description", EPILOG_METHODS)
    sub.set_defaults(func=_cmd_methods)

    sub = command("generate", "generate text greedily with a bounded cache, streamed to stdout", EPILOG_GENERATE)
    method_options(sub, None, "prompt tokens per compression step (default 32; 1 = token by token)")
    sub.add_argument("--max-new-tokens", type=positive_int, default=64, help="tokens to generate (default 64)")
    sub.add_argument("--raw", action="store_true", help="do not apply the tokenizer's chat template")
    threads_option(sub)
    sub.add_argument("prompt", help="the prompt (the user message when the chat template applies)")
    sub.set_defaults(func=_cmd_generate)

    sub = command("ask", "compress a context once and answer several questions from it", EPILOG_ASK)
    method_options(sub, None, "context tokens per compression step (default 32; 1 = token by token)")
    sub.add_argument("--context", type=Path, required=True, help="text file holding the context")
    sub.add_argument("--question", action="append", required=True, help="a question (repeat for several)")
    sub.add_argument("--max-new-tokens", type=positive_int, default=64, help="tokens per answer (default 64)")
    sub.add_argument("--batch-size", type=positive_int, help="questions answered per batch (default: all at once)")
    sub.add_argument("--raw", action="store_true", help="do not apply the tokenizer's chat template")
    sub.add_argument("--json", action="store_true", help="print one JSON object (answers, memory, seconds)")
    threads_option(sub)
    sub.set_defaults(func=_cmd_ask)

    sub = command("ppl", "streaming perplexity of a text through a bounded cache", EPILOG_PPL)
    method_options(sub, 1, "tokens per compression step (default 1 = token by token)")
    sub.add_argument(
        "--data",
        default="wikitext2",
        help=f"{' or '.join(SOURCES)} or the path of a text file (default wikitext2)",
    )
    sub.add_argument(
        "--data-dir",
        type=Path,
        help=DATA_DIR_HELP,
    )
    sub.add_argument("--tokens", type=positive_int, default=1024, help="tokens fed, BOS included (default 1024)")
    sub.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    sub.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    threads_option(sub)
    sub.set_defaults(func=_cmd_ppl)

    sub = command("demo", "compare the methods' perplexity and KV memory on the Paul Graham essays", EPILOG_DEMO)
    sub.add_argument("--tokens", type=positive_int, default=800, help="tokens fed one by one (default 800)")
    sub.add_argument("--budget", type=parse_budget, default=0.2, help="budget of every method but full (default 0.2)")
    sub.add_argument("--out", type=Path, default=Path("runs") / "demo", help="output directory (default runs/demo)")
    sub.add_argument("--force", action="store_true", help="overwrite the results already in --out")
    sub.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct), a local path or hub id")
    sub.add_argument(
        "--methods", default=",".join(DEMO_METHODS), help=f"comma-separated (default {','.join(DEMO_METHODS)})"
    )
    sub.add_argument("--seed", type=int, default=0, help="seed of the methods' random choices (default 0)")
    sub.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    threads_option(sub)
    sub.set_defaults(func=_cmd_demo)

    sub = command("train-less", "train LESS's kernels for a model and selector policy", EPILOG_TRAIN_LESS)
    sub.add_argument("--method", required=True, help="the selector whose evictions LESS absorbs (h2o, streaming, ...)")
    sub.add_argument("--budget", type=parse_budget, required=True, help="the selector's budget (int or fraction)")
    sub.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct), a local path or hub id")
    sub.add_argument("--out", type=Path, help="kernel directory (default ~/.cache/kvmerge/less/MODEL-METHOD-BUDGET)")
    sub.add_argument("--force", action="store_true", help="overwrite kernels already in the kernel directory")
    sub.add_argument("--sequences", type=positive_int, default=128, help="training windows (default 128)")
    sub.add_argument("--tokens", type=positive_int, default=512, help="tokens per window (default 512)")
    sub.add_argument("--epochs", type=positive_int, default=2, help="passes over the windows per layer (default 2)")
    sub.add_argument("--learning-rate", type=float, default=1e-2, help="Adam's learning rate (default 0.01)")
    sub.add_argument("--seed", type=int, default=0, help="seed of the kernels' initialisation (default 0)")
    sub.add_argument("--data-dir", type=Path, help=DATA_DIR_HELP)
    sub.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    sub.add_argument("--threads", type=positive_int, default=2, help="torch CPU threads (default 2)")
    sub.set_defaults(func=_cmd_train_less)

    sub = command("calibrate-kvmerger", "find KVMerger's similarity threshold for a model", EPILOG_CALIBRATE)
    sub.add_argument("--target", type=float, required=True, help="fraction of entries merging alone keeps, (0, 1)")
    sub.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct), a local path or hub id")
    sub.add_argument("--tokens", type=positive_int, default=1024, help="tokens of held-out text (default 1024)")
    sub.add_argument("--data-dir", type=Path, help=DATA_DIR_HELP)
    threads_option(sub)
    sub.set_defaults(func=_cmd_calibrate)

    add_eval_commands(commands)
    add_bench_command(commands)
    return parser


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """kvmerge's own warnings as one ``kvmerge: warning: ...`` line; others as Python prints them."""
    if "kvmerge" in filename and issubclass(category, UserWarning):
        return f"kvmerge: warning: {message}\n"
    return _python_format_warning(message, category, filename, lineno, line)


_python_format_warning = warnings.formatwarning


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``kvmerge`` command with ``argv`` (default ``sys.argv[1:]``); returns the exit status:
    0, or 2 after a one-line ``kvmerge: error: ...`` on stderr for a user error."""
    warnings.formatwarning = _format_warning
    try:
        args = build_parser().parse_args(argv)
        if hasattr(args, "threads"):
            torch.set_num_threads(args.threads)
        if getattr(args, "no_progress", False):
            transformers.utils.logging.disable_progress_bar()
        return args.func(args)
    except UsageError as error:
        print(f"kvmerge: error: {error}", file=sys.stderr)
        return 2
