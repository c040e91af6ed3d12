"""imagen-batch's throughput on the CPU: the same prompts in-process, on Ray Data with 1 and 2 replicas,
and as one imagen-run process per prompt (a shell loop), in images per second, side by side in one run.

Every path is timed whole, start-up included, as a user meets it: imagen-batch's local run loads the
bundle once; the Ray runs start their replicas (each loads the bundle) on a local Ray started once
before (its own start-up is not counted); the imagen-run loop pays a process and a load per prompt.
All use the bundle's default settings and the same seeds (imagen-batch's, from the ids), and the
same CPU threads in all: the Ray runs split them between the replicas.

    python -m bench.cpu.batch [--bundle DIR] [--n 16] [--threads 2] [--steps N] [--json FILE]
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..machine import machine, physical_cores
from ..prompts import prompts_for


def write_prompts(folder: Path, n: int) -> Path:
    path = folder / "prompts.txt"
    path.write_text("".join(prompt + "\n" for prompt in prompts_for(n)))
    return path


def time_local(prompts: Path, out: Path, bundle, threads: int, steps) -> float:
    from imagen.runtime.batch import Defaults, run_job

    start = time.perf_counter()
    run_job(prompts, out, bundle=bundle, defaults=Defaults(steps=steps), threads=threads, index="jsonl")
    return time.perf_counter() - start


def time_ray(prompts: Path, out: Path, bundle, threads: int, replicas: int, steps) -> float:
    from imagen.runtime.batch import Defaults, run_job

    share = max(1, threads // replicas)
    start = time.perf_counter()
    run_job(
        prompts,
        out,
        bundle=bundle,
        defaults=Defaults(steps=steps),
        index="jsonl",
        use_ray=True,
        replicas=replicas,
        cpus_per_replica=share,
        threads=share,
    )
    return time.perf_counter() - start


def time_imagen_run(prompts: Path, out: Path, bundle, threads: int, steps) -> float:
    """One `imagen-run` process per prompt, with the seed imagen-batch gives its line."""
    from imagen.runtime.batch import seed_from_id

    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for line, prompt in enumerate(prompts.read_text().splitlines(), start=1):
        command = [sys.executable, "-m", "imagen.runtime.cli", prompt, "-o", str(out / f"{line}.png"), "--quiet"]
        command += ["--seed", str(seed_from_id(str(line))), "--threads", str(threads)]
        command += [] if bundle is None else ["--bundle", str(bundle)]
        command += [] if steps is None else ["--steps", str(steps)]
        subprocess.run(command, check=True)
    return time.perf_counter() - start


def run(bundle=None, *, n: int = 16, threads: int | None = None, steps: int | None = None) -> dict:
    import ray

    threads = threads or physical_cores()
    rows = {}
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as folder:
        folder = Path(folder)
        prompts = write_prompts(folder, n)
        rows["imagen-batch, in-process"] = time_local(prompts, folder / "local", bundle, threads, steps)
        ray.init(num_cpus=threads, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        try:
            for replicas in (1, 2):
                seconds = time_ray(prompts, folder / f"ray{replicas}", bundle, threads, replicas, steps)
                rows[f"imagen-batch --ray, {replicas} replica{'s' if replicas > 1 else ''}"] = seconds
        finally:
            ray.shutdown()
        rows["imagen-run per prompt (loop)"] = time_imagen_run(prompts, folder / "run", bundle, threads, steps)
    local = rows["imagen-batch, in-process"]
    return {
        "machine": machine(),
        "config": {"images": n, "threads": threads, "steps": steps, "bundle": str(bundle or "demo")},
        "rows": {
            name: {"seconds": seconds, "images_per_s": n / seconds, "vs_local": local / seconds}
            for name, seconds in rows.items()
        },
    }


def markdown(report: dict) -> str:
    config = report["config"]
    lines = [
        f"{config['images']} images, {config['threads']} threads, steps {config['steps'] or 'bundle default'}",
        "",
        "| path | seconds | images/s | vs in-process |",
        "|---|---:|---:|---:|",
    ]
    for name, row in report["rows"].items():
        lines.append(f"| {name} | {row['seconds']:.2f} | {row['images_per_s']:.2f} | {row['vs_local']:.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu.batch", description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", default=None, help="bundle folder (default: the embedded demo)")
    parser.add_argument("--n", type=int, default=16, help="prompts, one image each")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads in all (default: physical cores)")
    parser.add_argument("--steps", type=int, default=None, help="steps per Unet (default: the bundle's)")
    parser.add_argument("--json", default=None, help="also write the report here")
    args = parser.parse_args(argv)
    report = run(args.bundle, n=args.n, threads=args.threads, steps=args.steps)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    print(markdown(report))


if __name__ == "__main__":
    main()
