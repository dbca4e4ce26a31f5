"""CaM's variants against their selectors on the development text (Wikitext-2 test, pg-essays).

Streaming perplexity token by token through SmolLM2 for every (data, budget, selector, variant, seed);
one JSON line per run in ``OUT/runs.jsonl``, appended as runs finish, and runs already there are
skipped, so the study can stop and continue. ``--shard I/N`` runs every N-th configuration (one
process per core). ``--summary`` prints the table of ``docs/BENCHMARKS.md`` from the JSON lines.

    OMP_NUM_THREADS=1 python scripts/cam_study.py --out runs/cam_study --shard 0/2 &
    OMP_NUM_THREADS=1 python scripts/cam_study.py --out runs/cam_study --shard 1/2
    python scripts/cam_study.py --out runs/cam_study --summary

The committed table of cam as shipped against its selectors (``docs/BENCHMARKS.md``):

    OMP_NUM_THREADS=1 python scripts/cam_study.py --out runs/cam_final --tokens 2048 --budgets 0.05,0.1,0.2,0.5 \
        --selectors full,streaming,h2o,scissorhands,tova,corm --variants none,cam --shard 0/2   # and 1/2
    python scripts/cam_study.py --out runs/cam_final --gaps
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from pathlib import Path

VARIANTS: dict[str, dict] = {
    "none": {},
    "cam": {},  # cam as shipped (its defaults)
    "mean": {"normalizer": "mean", "gate": "bernoulli", "centered": False, "targets": "next"},
    "max": {"normalizer": "max", "gate": "bernoulli", "centered": False, "targets": "next"},
    "max-windows": {"normalizer": "max", "max_over": "windows", "gate": "bernoulli", "centered": False, "targets": "next"},
    "max-expected": {"normalizer": "max", "gate": "expected", "centered": False, "targets": "next"},
    "mean-centered": {"normalizer": "mean", "centered": True, "gate": "bernoulli", "targets": "next"},
    "mean-centered-expected": {"normalizer": "mean", "centered": True, "gate": "expected", "targets": "next"},
    "max-centered": {"normalizer": "max", "centered": True, "gate": "bernoulli", "targets": "next"},
    "max-window": {"normalizer": "max", "targets": "window", "gate": "bernoulli", "centered": False},
    "max-expected-window": {"normalizer": "max", "targets": "window", "gate": "expected", "centered": False},
    "max-expected-centered-window": {"normalizer": "max", "targets": "window", "gate": "expected", "centered": True},
    "max-expected-centered": {"normalizer": "max", "gate": "expected", "centered": True, "targets": "next"},
    "max-per-step": {"normalizer": "max", "per_step": True, "gate": "bernoulli", "centered": False, "targets": "next"},
    "mean-per-step-centered-expected": {
        "normalizer": "mean", "per_step": True, "centered": True, "gate": "expected", "targets": "next",
    },
}


def configurations(args: argparse.Namespace) -> list[dict]:
    grid = itertools.product(args.data, args.budgets, args.selectors, args.variants, args.seeds)
    runs = []
    for data, budget, selector, variant, seed in grid:
        if (variant == "none" or selector == "full") and seed != args.seeds[0]:
            continue  # the selectors draw nothing: one seed
        if selector == "full" and (variant != "none" or budget != args.budgets[0]):
            continue  # the full cache has no budget: once per text
        runs.append({"data": data, "budget": budget, "selector": selector, "variant": variant, "seed": seed})
    return runs


def key(run: dict) -> tuple:
    return run["data"], run["budget"], run["selector"], run["variant"], run["seed"], run["tokens"]


def finished(log: Path) -> set[tuple]:
    return {key(json.loads(line)) for line in log.read_text().splitlines()} if log.exists() else set()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/cam_study"))
    parser.add_argument("--data", type=lambda s: s.split(","), default=["wikitext2", "pg-essays"])
    parser.add_argument("--budgets", type=lambda s: [float(x) for x in s.split(",")], default=[0.1, 0.2])
    parser.add_argument(
        "--selectors", type=lambda s: s.split(","), default=["streaming", "h2o", "tova", "scissorhands"]
    )
    parser.add_argument("--variants", type=lambda s: s.split(","), default=list(VARIANTS))
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0])
    parser.add_argument("--tokens", type=int, default=800)
    parser.add_argument("--merge-window", type=int, default=16)
    parser.add_argument("--shard", default="0/1")
    parser.add_argument("--summary", action="store_true", help="print the table of every variant")
    parser.add_argument("--gaps", action="store_true", help="print selector -> cam and the share of the gap closed")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "runs.jsonl"
    done = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    if args.summary or args.gaps:
        (summarize_gaps if args.gaps else summarize)(done)
        return
    import torch

    import kvmerge
    from kvmerge.eval.data import load_text
    from kvmerge.eval.perplexity import streaming_perplexity

    torch.set_num_threads(1)
    model, tokenizer = kvmerge.load_model("default")
    texts = {name: load_text(name) for name in args.data}
    index, count = (int(x) for x in args.shard.split("/"))
    for i, run in enumerate(configurations(args)):
        run["tokens"] = args.tokens
        if args.merge_window != 16:
            run["merge_window"] = args.merge_window
        if i % count != index or key(run) in finished(log):  # read again: another process may have run it
            continue
        method = run["selector"] if run["variant"] == "none" else run["selector"] + "+cam"
        budget = None if method == "full" else run["budget"]
        options = dict(VARIANTS[run["variant"]])
        if args.merge_window != 16:
            options["merge_window"] = args.merge_window
        result = streaming_perplexity(
            model,
            tokenizer,
            texts[run["data"]],
            method,
            budget,
            tokens=args.tokens,
            seed=run["seed"],
            progress=False,
            **options,
        )
        record = {**run, "ppl": result["ppl"], "seconds": result["seconds"], "settings": result["settings"]}
        with log.open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)


def summarize_gaps(done: list[dict]) -> None:
    """Selector alone -> with cam as shipped, and the share of the selector-to-full gap cam closes."""
    full = {r["data"]: r["ppl"] for r in done if r["selector"] == "full"}
    cells: dict[tuple, list[float]] = {}
    for r in done:
        if r["selector"] != "full" and r["variant"] in ("none", "cam"):
            cells.setdefault((r["data"], r["budget"], r["selector"], r["variant"]), []).append(r["ppl"])
    selectors = list(dict.fromkeys(k[2] for k in cells))
    print("| data | budget | full | " + " | ".join(selectors) + " |")
    print("|---" * (3 + len(selectors)) + "|")
    for data, budget in sorted({k[:2] for k in cells}):
        row = []
        for selector in selectors:
            alone, cam = cells.get((data, budget, selector, "none")), cells.get((data, budget, selector, "cam"))
            if not alone or not cam:
                row.append("")
                continue
            a, c = statistics.mean(alone), statistics.mean(cam)
            if data not in full or a - full[data] < 0.01 * full[data]:  # no gap to close
                row.append(f"{a:.2f} → {c:.2f} (no gap)")
                continue
            row.append(f"{a:.2f} → {c:.2f} ({100 * (a - c) / (a - full[data]):+.1f}%)")
        print(f"| {data} | {budget:g} | {full.get(data, float('nan')):.2f} | " + " | ".join(row) + " |")


def summarize(done: list[dict]) -> None:
    cells: dict[tuple, list[float]] = {}
    for r in done:
        cells.setdefault((r["data"], r["budget"], r["selector"], r["variant"]), []).append(r["ppl"])
    variants = [v for v in VARIANTS if any(k[3] == v for k in cells)]
    print("| data | budget | selector | " + " | ".join(variants) + " |")
    print("|---" * (3 + len(variants)) + "|")
    for data, budget, selector in sorted({k[:3] for k in cells}):
        row = []
        for v in variants:
            ppls = cells.get((data, budget, selector, v))
            if not ppls:
                row.append("")
            elif len(ppls) == 1:
                row.append(f"{ppls[0]:.2f}")
            else:
                row.append(f"{statistics.mean(ppls):.2f} ± {statistics.stdev(ppls):.2f}")
        print(f"| {data} | {budget:g} | {selector} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
