"""Runs the chosen sections, at the sizes of a full run or a quick one, and collects their
results with the machine they ran on."""

import sys
import time
from pathlib import Path

from ..machine import machine, physical_cores
from .engine_efficiency import engine_efficiency
from .memory import memory_and_cold_start
from .outside_engine import outside_engine
from .reference_vs_runtime import reference_vs_runtime
from .steps_vs_quality import steps_vs_quality
from .workload import default_run_dir

SECTIONS = (1, 2, 3, 4, 5)


def chosen_sections(text: str) -> list[int]:
    """'1,3' -> [1, 3]; SystemExit naming the choices on an unknown section."""
    wanted = sorted({int(s) for s in text.split(",") if s.strip()})
    unknown = [s for s in wanted if s not in SECTIONS]
    if unknown:
        raise SystemExit(f"unknown sections {unknown}; choose from {list(SECTIONS)}")
    return wanted


def bundle_dir(path) -> Path:
    """The bundle folder to measure: `path`, or the runtime's demo bundle when None."""
    if path is None:
        from imagen.runtime.pipeline import DEMO_BUNDLE

        path = DEMO_BUNDLE
    path = Path(path)
    if not (path / "manifest.json").is_file():
        raise SystemExit(f"{path} is not a bundle (no manifest.json); pass --bundle BUNDLE_DIR")
    return path


def _sections(args, bundle: Path, run_dir, threads: int) -> dict:
    """Section number -> a call that measures it, with the sizes of a full or a quick run."""
    quick = args.quick
    # Sections 1 and 3: the bundle's defaults unless told; quick mode keeps them short.
    request = dict(
        threads=threads,
        sampler=args.sampler or ("ddim" if quick else None),
        steps=args.steps or (3 if quick else None),
        batch=min(args.batch, 2) if quick else args.batch,
        seed=args.seed,
    )
    return {
        1: lambda: reference_vs_runtime(run_dir, bundle, **request, repeats=1 if quick else 5),
        2: lambda: engine_efficiency(
            bundle, threads=threads, quick=quick, runs=args.runs or (3 if quick else 10), gemm_n=256 if quick else 2048
        ),
        3: lambda: outside_engine(bundle, **request, repeats=1 if quick else 2),
        4: lambda: steps_vs_quality(
            bundle,
            threads=threads,
            n=args.n or (4 if quick else 96),
            batch=8,
            split=args.split,
            seed=args.seed,
            seeds=args.seeds or (1 if quick else 2),
        ),
        5: lambda: memory_and_cold_start(bundle, threads=threads, repeats=1 if quick else 5, steps=2 if quick else 10),
    }


def run_suite(args, argv: list[str]) -> dict:
    """Every section `args.sections` names, in order; progress goes to stderr."""
    wanted = chosen_sections(args.sections)
    bundle = bundle_dir(args.bundle)
    run_dir = args.run if args.run is not None else default_run_dir(bundle)
    threads = args.threads or physical_cores()
    started = time.perf_counter()
    results = {
        "machine": machine(),
        "bundle": str(bundle),
        "run": str(run_dir) if run_dir else None,
        "threads": threads,
        "quick": args.quick,
        "argv": argv,
        "sections": {},
    }

    def say(message):
        print(f"[bench {time.perf_counter() - started:6.1f} s] {message}", file=sys.stderr, flush=True)

    sections = _sections(args, bundle, run_dir, threads)
    for section in wanted:
        say(f"section {section}")
        out = sections[section]()
        results["sections"][str(section)] = out
        if "skipped" in out:
            say(f"section {section} skipped: {out['skipped']}")
    results["seconds"] = time.perf_counter() - started
    return results
