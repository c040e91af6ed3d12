"""Training throughput at 1 and 2 processes on this CPU: `imagen-train` steps per second with the
demo recipe's cascade (recipes/demo/unet_*.json and train.sh's settings: 32 -> 64, T = 250, global
batch 16), one process against `torchrun` processes that share the same cores, side by side in one run.

    python -m bench.cpu.train_ddp [--procs 1,2] [--steps 12] [--warmup 2] [--threads N] [--json FILE]
    python -m bench.cpu.train_ddp --quick        # the tests' tiny cascade, 3 steps: a smoke run

One process runs `python -m imagen.reference.cli` with all the threads; N > 1 runs
`python -m torch.distributed.run --standalone --nproc-per-node N -m imagen.reference.cli` with the
threads split between the processes (gloo all-reduces the gradients). Each run trains into a
temporary folder with validation and checkpoints only after its last step, and its rate is read from
its own log.jsonl: (steps - warmup) / (time of the last step - time of the warmup-th step), so
start-up, the first steps and the final validation and checkpoint are not counted.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from ..machine import machine, physical_cores

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "recipes" / "demo"


def recipe_args(quick: bool) -> list[str]:
    """imagen-train's options for the demo cascade (recipes/demo/train.sh), or a tiny one."""
    if quick:
        return ["--image-sizes", "16,32", "--timesteps", "30", "--batch-size", "4", "--max-length", "24"]
    return [
        *("--unet", str(DEMO / "unet_base.json"), "--unet", str(DEMO / "unet_super.json")),
        *("--image-sizes", "32,64", "--timesteps", "250", "--batch-size", "16", "--lr", "3e-4"),
        *("--ema-decay", "0.995", "--lowres-max-noise", "0.3", "--cond-drop-prob", "0.1", "--guidance", "3.0"),
        *("--max-length", "64", "--text-encoder", "tiny"),
    ]


def steps_per_second(procs: int, threads: int, steps: int, warmup: int, quick: bool, work: Path) -> dict:
    """One training run of `steps` at `procs` processes with `threads` threads each; its rate."""
    out = work / f"procs{procs}"
    args = [*recipe_args(quick), "--out", str(out), "--steps", str(steps), "--val-every", str(steps)]
    args += ["--checkpoint-every", str(steps), "--sample-every", "0", "--seed", "0", "--threads", str(threads)]
    args += ["--quiet"]
    launcher = [sys.executable, "-m", "imagen.reference.cli"]
    if procs > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs)]
        launcher += ["-m", "imagen.reference.cli"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = str(threads)
    done = subprocess.run([*launcher, *args], capture_output=True, text=True, env=env, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"training at {procs} process(es) failed: {done.stderr.strip()[-2000:]}")
    times = {r["step"]: r["time"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())}
    rate = (steps - warmup) / (times[steps] - times[warmup])
    return {"procs": procs, "threads_per_proc": threads, "steps": steps, "warmup": warmup, "steps_per_s": rate}


def table(results: dict) -> str:
    base = results["rows"][0]["steps_per_s"]
    lines = [
        f"{results['machine']['cpu']}, {results['machine']['date']}; {results['config']}",
        "",
        "| processes | threads each | steps/s | images/s | vs 1 process |",
        "|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        images = row["steps_per_s"] * results["batch_size"]
        lines.append(
            f"| {row['procs']} | {row['threads_per_proc']} | {row['steps_per_s']:.3f} | {images:.2f} "
            f"| {row['steps_per_s'] / base:.2f}x |"
        )
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu.train_ddp", description=__doc__.split("\n\n")[0])
    parser.add_argument("--procs", default="1,2", help="comma-separated process counts (default 1,2)")
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default 12; quick 3)")
    parser.add_argument("--warmup", type=int, default=None, help="steps not counted (default 2; quick 1)")
    parser.add_argument("--threads", type=int, default=None, help="threads in all (default: physical cores)")
    parser.add_argument("--quick", action="store_true", help="the tests' tiny cascade, 3 steps (a smoke run)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    args = parser.parse_args(argv)
    steps = args.steps or (3 if args.quick else 12)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    if not 0 < warmup < steps:
        parser.error(f"--warmup must be at least 1 and below --steps ({steps})")
    total = args.threads or physical_cores()
    procs = [int(p) for p in args.procs.split(",")]
    with tempfile.TemporaryDirectory(prefix="imagen-train-ddp-") as work:
        rows = []
        for count in procs:
            print(f"training at {count} process(es)", file=sys.stderr, flush=True)
            rows.append(steps_per_second(count, max(1, total // count), steps, warmup, args.quick, Path(work)))
    config = "tiny cascade 16 -> 32, batch 4" if args.quick else "demo recipe 32 -> 64, T = 250, batch 16"
    results = {
        "machine": machine(),
        "config": f"{config}, {steps} steps ({warmup} not counted), {total} threads in all, gloo",
        "batch_size": 4 if args.quick else 16,
        "rows": rows,
    }
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
