"""The ``kvmerge eval ...`` and ``kvmerge report`` subcommands (wired into :mod:`kvmerge.cli`)."""

from __future__ import annotations

import argparse
import contextlib
import textwrap
from collections.abc import Iterator
from pathlib import Path

from kvmerge.eval.data import DATA_DIR_HELP

PAPER_METHODS = "full,streaming,streaming+cam,h2o,h2o+cam"
PAIRS = "streaming,streaming+cam,h2o,h2o+cam"
TEACHER_FORCED = ("ppl", "qa", "perturbation")  # score whole texts in one forward call: step schedule only
TEXT_BENCHMARKS = ("ppl", "perturbation", "growth")  # stream the first --limit tokens of --dataset


EVAL_EXAMPLES = """examples:
  kvmerge eval ppl --methods full,h2o,h2o+cam --budgets 0.1,0.2 --limit 512
  kvmerge eval qa --methods full,h2o,h2o+cam --budgets 0.2 --limit 40 --out runs/qa-40
  kvmerge eval needle --methods full,streaming,h2o+cam --budgets 0.2 --lengths 256,512 --limit 3
  kvmerge eval perturbation --methods h2o,h2o+cam --budgets 0.2 --no-progress
  kvmerge report runs/eval-qa                     # re-render a results folder

Each writes results.json, results.md and PNG plots into --out (refused if it holds results: --force
overwrites them; ppl, qa, summarization and needle write after every run and --resume continues them).
Run 'kvmerge eval BENCHMARK --help' for its options.
"""


def _methods(text: str) -> list[str]:
    import kvmerge

    methods = [m.strip() for m in text.split(",") if m.strip()]
    known = set(kvmerge.method_names())
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown method(s) {unknown}; valid: {', '.join(sorted(known))}")
    return methods


def _count(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive count, got {text!r}")
    return int(text)


def _number(text: str) -> int | float:
    return float(text) if any(c in text for c in ".eE") else int(text)


def _numbers(text: str) -> list[int | float]:
    try:
        return [_number(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of numbers, got {text!r}") from None


def _ints(text: str) -> list[int]:
    values = _numbers(text)
    if not all(isinstance(v, int) for v in values):
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {text!r}")
    return values


def parse_option(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` -> ``(key, value)``, the value read as an int, a float, a bool or else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. merge_window=32), got {text!r}")
    for parse in (int, float):
        try:
            return key.strip(), parse(value)
        except ValueError:
            pass
    return key.strip(), {"true": True, "false": False}.get(value.lower(), value)


def _add_common(parser: argparse.ArgumentParser, methods: str, budgets: str, limit: int | None, limit_help: str):
    parser.add_argument("--methods", type=_methods, default=_methods(methods), help=f"comma list (default {methods})")
    parser.add_argument(
        "--budgets",
        type=_numbers,
        default=_numbers(budgets),
        help=f"comma list; float = fraction, int = tokens ({budgets})",
    )
    parser.add_argument("--seeds", type=_ints, default=[0], help="comma list; only seeded methods (+cam) repeat (0)")
    parser.add_argument("--limit", type=int, default=limit, help=f"{limit_help} (default {limit or 'all'})")
    parser.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct), a path or a hub id")
    parser.add_argument(
        "--chunk",
        type=int,
        default=None,
        help="tokens per compression step (1 = token by token; default 1 for qa, ppl, perturbation, 16 otherwise)",
    )
    parser.add_argument("--data-dir", default=None, help=DATA_DIR_HELP)
    parser.add_argument(
        "--option",
        dest="options",
        type=parse_option,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a make_cache option for every method that takes it (repeatable): merge_window=32, "
        "similarity=0.87, kernels=DIR (for +less), sink=8, ...",
    )


def _subcommand(
    subparsers, name: str, summary: str, examples: str, out: str, resumable: bool = False
) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        name,
        help=summary,
        description=summary,
        epilog="examples:\n" + textwrap.indent(textwrap.dedent(examples).strip(), "  "),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=Path("runs") / out, help=f"results folder (default runs/{out})")
    parser.add_argument("--force", action="store_true", help="overwrite the results already in --out")
    if resumable:
        parser.add_argument(
            "--resume",
            action="store_true",
            help="continue the results in --out: skip the runs it holds, add the others (refused when its "
            "configuration, data or kvmerge/transformers versions differ)",
        )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    parser.add_argument(
        "--threads", type=_count, default=1, help="torch CPU threads (default 1; more oversubscribe small steps)"
    )
    return parser


def add_eval_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``eval {ppl,qa,summarization,needle,perturbation,growth}`` and ``report DIR`` to a CLI's subparsers.

    Every leaf parser has a ``func(args) -> int`` default (the exit code).
    """
    evaluate = subparsers.add_parser(
        "eval",
        help="benchmarks of the CaM paper",
        description="Run a benchmark; writes results.json/.md and plots into --out.",
        epilog=EVAL_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    benchmarks = evaluate.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)

    ppl = _subcommand(
        benchmarks,
        "ppl",
        "perplexity against budget (streaming, token by token), one line per method",
        """
        kvmerge eval ppl --methods full,streaming,streaming+cam --budgets 0.1,0.3,0.5,0.7,0.9 --limit 512
        kvmerge eval ppl --dataset pg-essays --methods h2o,h2o+cam --seeds 0,1,2 --out runs/ppl-pg
        """,
        "eval-ppl",
        resumable=True,
    )
    _add_common(
        ppl, "full,streaming,streaming+cam,h2o,h2o+cam", "0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9", 512, "tokens scored"
    )
    ppl.add_argument("--dataset", default="wikitext2", help="wikitext2, pg-essays or a text file (wikitext2)")
    ppl.set_defaults(func=_run_ppl, chunk_default=1)

    qa = _subcommand(
        benchmarks,
        "qa",
        "CaM Table 1: zero-shot lm-eval accuracy on COPA, PIQA, OpenBookQA, WinoGrande, RTE, MathQA",
        """
        kvmerge eval qa --methods full,streaming,streaming+cam,h2o,h2o+cam --budgets 0.2 --limit 40
        kvmerge eval qa --tasks kvmerge_copa,kvmerge_rte --methods h2o+cam --seeds 0,1,2,3,4 --limit 100
        """,
        "eval-qa",
        resumable=True,
    )
    _add_common(qa, PAPER_METHODS, "0.2", None, "documents per task")
    qa.add_argument("--tasks", default=None, help="comma list of lm-eval tasks (the six kvmerge_* tasks)")
    qa.add_argument("--batch-size", type=int, default=32, help="sequences per forward call (32)")
    qa.set_defaults(func=_run_qa, chunk_default=1)

    summarization = _subcommand(
        benchmarks,
        "summarization",
        "XSUM / CNN-DailyMail zero-shot ROUGE-1/2/L, greedy generation through the compressed cache",
        """
        kvmerge eval summarization --dataset xsum --methods full,h2o,h2o+cam --budgets 0.2 --limit 20
        kvmerge eval summarization --dataset cnn_dailymail --budgets 0.1,0.2,0.5 --limit 50 --out runs/cnndm
        """,
        "eval-summarization",
        resumable=True,
    )
    _add_common(summarization, PAPER_METHODS, "0.2", 20, "articles")
    summarization.add_argument("--dataset", choices=["xsum", "cnn_dailymail"], default="xsum")
    summarization.add_argument("--batch-size", type=int, default=4, help="prompts per generate call (4)")
    summarization.add_argument("--max-new-tokens", type=int, default=64)
    summarization.set_defaults(func=_run_summarization, chunk_default=16)

    needle = _subcommand(
        benchmarks,
        "needle",
        "needle in a haystack (Paul Graham essays): retrieval accuracy heatmap, depth x context length",
        """
        kvmerge eval needle --methods full,streaming,h2o+cam --budgets 0.2 --lengths 256,512,1024 --limit 5
        kvmerge eval needle --methods h2o+cam --budgets 0.1,0.5 --seeds 0,1,2 --out runs/needle
        """,
        "eval-needle",
        resumable=True,
    )
    _add_common(needle, PAPER_METHODS, "0.5", 5, "needle depths, evenly spaced from 0%% to 100%%")
    needle.add_argument("--lengths", type=_ints, default=[256, 512, 1024], help="context lengths in tokens")
    needle.set_defaults(func=_run_needle, chunk_default=16)

    perturbation = _subcommand(
        benchmarks,
        "perturbation",
        "CaM Fig. 1d: per-layer relative error of attention outputs against the full cache, eviction vs merging",
        """
        kvmerge eval perturbation --methods streaming,streaming+cam,h2o,h2o+cam --budgets 0.2 --limit 512
        kvmerge eval perturbation --dataset wikitext2 --budgets 0.1,0.3 --seeds 0,1,2
        """,
        "eval-perturbation",
    )
    _add_common(perturbation, PAIRS, "0.2", 512, "tokens of text")
    perturbation.add_argument("--dataset", default="pg-essays", help="wikitext2, pg-essays or a text file (pg-essays)")
    perturbation.set_defaults(func=_run_perturbation, chunk_default=1)

    growth = _subcommand(
        benchmarks,
        "growth",
        "value-norm growth on a long stream: the largest value norm of any layer, merging vs the selector alone",
        """
        kvmerge eval growth --methods h2o,h2o+cam,tova,tova+cam --budgets 256 --limit 20000
        kvmerge eval growth --methods streaming,streaming+cam --budgets 256 --option normalizer=mean --limit 5000
        """,
        "eval-growth",
    )
    _add_common(growth, PAIRS, "256", 20_000, "tokens streamed")
    growth.add_argument("--dataset", default="pg-essays", help="wikitext2, pg-essays or a text file (pg-essays)")
    growth.add_argument("--every", type=int, default=1000, help="tokens between measurements (1000)")
    growth.set_defaults(func=_run_growth, chunk_default=16)

    report = subparsers.add_parser(
        "report",
        help="re-render results.md and the plots of a results folder from its results.json",
        description="Re-render results.md and the plots of a results folder from its results.json.",
        epilog="example:\n  kvmerge report runs/eval-qa",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    report.add_argument("dir", type=Path, help="a folder written by `kvmerge eval ...`")
    report.add_argument(
        "--publish",
        type=Path,
        metavar="JSON",
        help="also write an `eval qa` folder as a citable table: accuracy, documents, per-document outcomes and "
        "their hash, the paired intervals and the command that measures each cell again (docs/results/table1.json)",
    )
    report.set_defaults(func=_run_report)


def _load(args: argparse.Namespace):
    """Validate every (method, budget) run and the model name, then load the model (errors before any compute)."""
    import kvmerge
    from kvmerge.absorbers.less import with_kernels
    from kvmerge.cli import UsageError, _model_name, _user_errors
    from kvmerge.eval.data import data_folder, load_text
    from kvmerge.eval.perplexity import require_step_schedule
    from kvmerge.eval.results import claim_out_dir, run_grid
    from kvmerge.models import model_label
    from kvmerge.registry import options_for

    args.options = dict(args.options)
    with _user_errors():
        unused = set(args.options) - {key for m in args.methods for key in options_for(m, args.options)}
        if unused:
            raise UsageError(f"no method of {','.join(args.methods)} takes option(s) {', '.join(sorted(unused))}")
        for method, budget, seed in run_grid(args.methods, args.budgets, args.seeds, args.options):
            own = with_kernels(method, budget, model_label(args.model), options_for(method, args.options))
            built = kvmerge.make_method(method, budget, seed=seed, chunk_size=_chunk(args), **own)
            if args.benchmark in TEACHER_FORCED:
                require_step_schedule(built)
        if args.limit is not None and args.limit < 1:
            raise UsageError(f"--limit must be a positive count, got {args.limit}")
        if args.benchmark in TEXT_BENCHMARKS and args.limit < 2:
            raise UsageError(f"--limit is the tokens of text, at least 2 (one to predict the next), got {args.limit}")
        if args.benchmark in TEXT_BENCHMARKS:  # the text is there (a missing file fails here, not after loading)
            load_text(args.dataset, args.data_dir)
        elif args.benchmark in ("qa", "summarization"):
            data_folder(args.data_dir)
        claim_out_dir(args.out, args.force, getattr(args, "resume", None))
        return kvmerge.load_model(_model_name(args.model))


@contextlib.contextmanager
def _resume_refusals() -> Iterator[None]:
    """A results folder that ``--resume`` cannot continue is a user error (one line, exit status 2)."""
    from kvmerge.cli import UsageError
    from kvmerge.eval.results import ResumeRefused

    try:
        yield
    except ResumeRefused as error:
        raise UsageError(str(error)) from error


def _chunk(args: argparse.Namespace) -> int:
    return args.chunk or args.chunk_default


def _done(out: Path) -> int:
    print((out / "results.md").read_text())
    print(f"written: {out}/results.json, results.md and plots")
    return 0


def _run_ppl(args: argparse.Namespace) -> int:
    from kvmerge.eval.sweep import run_ppl_sweep

    model, tok = _load(args)
    with _resume_refusals():
        run_ppl_sweep(
            model, tok, args.dataset, args.methods, args.budgets, args.seeds, tokens=args.limit, chunk=_chunk(args),
            out_dir=args.out, data_dir=args.data_dir, model_name=args.model, options=args.options,
            progress=not args.no_progress, resume=args.resume,
        )  # fmt: skip
    return _done(args.out)


def _run_qa(args: argparse.Namespace) -> int:
    from kvmerge.eval.harness import QA_TASKS
    from kvmerge.eval.qa import run_qa

    model, tok = _load(args)
    tasks = tuple(args.tasks.split(",")) if args.tasks else QA_TASKS
    with _resume_refusals():
        run_qa(
            model, tok, args.methods, args.budgets, args.seeds, tasks=tasks, limit=args.limit, out_dir=args.out,
            batch_size=args.batch_size, chunk=_chunk(args), data_dir=args.data_dir, model_name=args.model,
            options=args.options, progress=not args.no_progress, resume=args.resume,
        )  # fmt: skip
    return _done(args.out)


def _run_summarization(args: argparse.Namespace) -> int:
    from kvmerge.eval.summarization import run_summarization

    model, tok = _load(args)
    with _resume_refusals():
        run_summarization(
            model, tok, args.dataset, args.methods, args.budgets, args.seeds, limit=args.limit, out_dir=args.out,
            batch_size=args.batch_size, chunk=_chunk(args), max_new_tokens=args.max_new_tokens,
            data_dir=args.data_dir, model_name=args.model, options=args.options, progress=not args.no_progress,
            resume=args.resume,
        )  # fmt: skip
    return _done(args.out)


def _run_needle(args: argparse.Namespace) -> int:
    from kvmerge.eval.needle import run_needle

    model, tok = _load(args)
    depths = [i / max(args.limit - 1, 1) for i in range(args.limit)]
    with _resume_refusals():
        run_needle(
            model, tok, args.methods, args.budgets, args.seeds, lengths=args.lengths, depths=depths, out_dir=args.out,
            chunk=_chunk(args), model_name=args.model, options=args.options, progress=not args.no_progress,
            resume=args.resume,
        )  # fmt: skip
    return _done(args.out)


def _run_perturbation(args: argparse.Namespace) -> int:
    from kvmerge.eval.data import load_text
    from kvmerge.eval.perturbation import run_perturbation

    model, tok = _load(args)
    text = load_text(args.dataset, args.data_dir)
    run_perturbation(
        model, tok, text, args.methods, args.budgets, args.seeds, tokens=args.limit, chunk=_chunk(args),
        out_dir=args.out, model_name=args.model, options=args.options, progress=not args.no_progress,
    )  # fmt: skip
    return _done(args.out)


def _run_growth(args: argparse.Namespace) -> int:
    from kvmerge.cli import UsageError
    from kvmerge.eval.data import load_text
    from kvmerge.eval.growth import run_growth

    if len(args.budgets) != 1 or not isinstance(args.budgets[0], int):
        raise UsageError(f"growth takes one int budget (entries per head), got {args.budgets}")
    if args.every < 1 or (args.limit or 0) < args.every:
        raise UsageError(f"--every must be between 1 and --limit ({args.limit}), got {args.every}")
    model, tok = _load(args)
    text = load_text(args.dataset, args.data_dir)
    run_growth(
        model, tok, text, args.methods, args.budgets[0], args.seeds, tokens=args.limit, chunk=_chunk(args),
        every=args.every, out_dir=args.out, model_name=args.model, options=args.options,
        progress=not args.no_progress,
    )  # fmt: skip
    return _done(args.out)


def _run_report(args: argparse.Namespace) -> int:
    import json

    from kvmerge.cli import UsageError
    from kvmerge.eval.qa import publish
    from kvmerge.eval.results import read_results, render_report

    if not (args.dir / "results.json").is_file():
        raise UsageError(f"{args.dir}/results.json not found: give a folder written by kvmerge (eval, demo, bench)")
    try:
        print(render_report(args.dir).read_text())
        payload = read_results(args.dir)
    except ValueError as error:  # a corrupt or foreign results.json
        raise UsageError(str(error)) from error
    if args.publish is not None:
        if payload["benchmark"] != "qa":
            raise UsageError(f"--publish takes an `eval qa` folder; {args.dir} holds {payload['benchmark']} results")
        args.publish.parent.mkdir(parents=True, exist_ok=True)
        args.publish.write_text(json.dumps(publish(payload), indent=1) + "\n")
        print(f"published: {args.publish}")
    return 0
