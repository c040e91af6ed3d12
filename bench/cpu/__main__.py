"""`python -m bench` (and `python -m bench.cpu`): the command line of the CPU suite (see bench/cpu/__init__.py)."""

import argparse
import json
import sys
from pathlib import Path

import bench.cpu

from .report import render, write_report
from .suite import run_suite


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench", description=bench.cpu.__doc__.split("\n\n")[0])
    parser.add_argument(
        "--bundle", type=Path, default=None, help="bundle folder (default: the package's demo bundle, runtime/demo)"
    )
    parser.add_argument(
        "--run",
        type=Path,
        default=None,
        help="the run directory the bundle was exported from, for section 1 (default: runs/demo; "
        "section 1 is skipped when there is none)",
    )
    parser.add_argument("--sections", default="1,2,3,4,5", help="comma-separated sections to run (default: all)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and counts (a smoke run, not a benchmark)")
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads for every engine and for torch (default: physical cores)"
    )
    parser.add_argument("--sampler", default=None, help="sections 1 and 3: sampler (default: the bundle's)")
    parser.add_argument(
        "--steps", type=int, default=None, help="sections 1 and 3: steps per Unet (default: the bundle's)"
    )
    parser.add_argument("--batch", type=int, default=4, help="sections 1 and 3: images per request (default 4)")
    parser.add_argument(
        "--n",
        type=int,
        default=None,
        help="section 4: captions per sampler and seed (default 96 at two seeds; quick 4 at one)",
    )
    parser.add_argument(
        "--seeds", type=int, default=None, help="section 4: seeds per sampler, 10,000 apart (default 2; quick 1)"
    )
    parser.add_argument("--split", default="train", choices=["train", "heldout"], help="section 4: caption split")
    parser.add_argument("--runs", type=int, default=None, help="section 2: timed engine calls (default 10, quick 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="write the Markdown report into this file (e.g. docs/benchmarks.md), between the bench markers",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the raw results as JSON")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    """Runs the suite, prints the report, writes it (--out) and the raw results (--json); returns the results."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    results = run_suite(args, argv)
    text = render(results)
    print(text)
    if args.out:
        write_report(args.out, text)
        print(f"[bench {results['seconds']:6.1f} s] report written to {args.out}", file=sys.stderr, flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return results


if __name__ == "__main__":
    main()
