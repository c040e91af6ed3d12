"""`python -m bench.gpu`'s run: the environment (section 6), then sections 7 to 9 in order within one
time budget, torch.compile and the engines in child processes stopped when the budget runs out."""

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import bench.gpu

from .cascade import GPU_SIZES, SMOKE_SIZES, Sizes, scaffold
from .env import cuda_reason, cupy_reason, environment
from .report import render

REPO = Path(__file__).resolve().parents[2]
SECTIONS = ("7", "8", "9")  # after the CPU suite's 1 to 5; 6 is the environment, always measured
CHILD_PREFIX = "BENCH"


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=bench.gpu.__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and counts (automatic without CUDA)")
    parser.add_argument(
        "--budget-s", type=float, default=None, help="seconds for the whole run (default 420; smoke 120)"
    )
    parser.add_argument("--json", type=Path, default=None, help="write the results as JSON (after every section)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="of 7,8,9 (the environment, 6, always)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/imagen-bench-gpu"), help="scaffold and engine files")
    parser.add_argument("--run", type=Path, default=None, help="section 8: a run directory (with --bundle)")
    parser.add_argument("--bundle", type=Path, default=None, help="section 8: the bundle exported from --run")
    parser.add_argument("--no-compile", action="store_true", help="section 7: leave out torch.compile")
    parser.add_argument("--compile-precision", default="fp16", choices=["fp16", "fp32"])
    parser.add_argument("--loop-precision", default=None, choices=["fp16", "fp32"], help="default: fp16 on CUDA")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch and ONNX Runtime")
    parser.add_argument("--seed", type=int, default=0)
    sizes = parser.add_argument_group("sizes (fields of bench.gpu.cascade.Sizes)")
    for field in dataclasses.fields(Sizes):
        gpu, smoke = getattr(GPU_SIZES, field.name), getattr(SMOKE_SIZES, field.name)
        flag, kind = "--" + field.name.replace("_", "-"), type(gpu)
        sizes.add_argument(flag, type=kind, default=None, help=f"default {gpu} ({smoke} in a smoke run)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if (args.run is None) != (args.bundle is None):
        parser.error("--run and --bundle go together: the run the bundle was exported from")
    return args


def resolve_sizes(args, smoke: bool) -> Sizes:
    """The mode's sizes with every size option given on the command line (--dim, --batch, ...)."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Sizes) if getattr(args, f.name) is not None}
    return dataclasses.replace(SMOKE_SIZES if smoke else GPU_SIZES, **given)


class Budget:
    """Seconds left of the run's budget."""

    def __init__(self, seconds: float):
        self.seconds, self.start = seconds, time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.seconds - self.elapsed()


def run_child(kind: str, payload: dict, timeout: float) -> dict:
    """`python -m bench.gpu --child KIND PAYLOAD` in its own process group; its result, or a reason
    when it fails or outlasts `timeout` (then the group, compile workers included, is killed)."""
    command = [sys.executable, "-m", "bench.gpu", "--child", kind, json.dumps(payload)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=REPO, start_new_session=True)
    try:
        out, _ = process.communicate(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        return {"reason": f"stopped after {timeout:.0f} s, the budget left; rerun with a larger --budget-s"}
    lines = [line for line in out.splitlines() if line.startswith(CHILD_PREFIX)]
    if process.returncode != 0 or not lines:
        return {"reason": f"the child process exited with status {process.returncode}; its stderr is above"}
    return json.loads(lines[-1][len(CHILD_PREFIX) :])


def child_main(kind: str, payload: str) -> None:
    """The child's side: one measurement, printed as one line of JSON (a reason when it fails)."""
    spec = json.loads(payload)
    sizes = Sizes(**spec["sizes"])
    try:
        if kind == "compile":
            from .reference import compile_child

            out = compile_child(sizes, spec["device"], spec["precision"])
        else:
            from .engines import engines_child

            out = engines_child(sizes, Path(spec["work"]))
    except Exception as error:  # reported as the row's reason
        out = {"reason": f"failed: {type(error).__name__}: {error}", "traceback": traceback.format_exc()}
    print(CHILD_PREFIX + json.dumps(out), flush=True)


def failed(error: Exception) -> dict:
    """A section that raised: its reason for the report, the traceback for the JSON only."""
    return {"reason": f"failed: {type(error).__name__}: {error}", "traceback": traceback.format_exc()}


def reference(ctx) -> dict:
    """Section 7: eager rows here, torch.compile in a child given what is left of the budget."""
    from .reference import reference_section

    section = reference_section(ctx.sizes, ctx.device, say=ctx.say)
    if ctx.cuda_reason:
        section["reasons"]["CUDA rows"] = f"{ctx.cuda_reason}; the rows above ran on the CPU"
        section["reasons"]["torch.compile"] = "measured on CUDA only"
    elif ctx.args.no_compile:
        section["reasons"]["torch.compile"] = "left out (--no-compile)"
    else:
        ctx.pending_compile = True
    return section


def add_compile_row(ctx) -> None:
    """The torch.compile row of section 7, last of all: it is the longest and the least predictable."""
    section, left = ctx.results["sections"]["reference"], ctx.budget.left() - 15
    name = f"torch.compile ({ctx.args.compile_precision.upper()} autocast)"
    if left < 60:
        section["reasons"][name] = f"skipped: {max(0.0, left):.0f} s of the budget left"
        return
    release_gpu_memory()
    ctx.say(f"section 7: {name}, in a child process (up to {left:.0f} s)")
    payload = {"sizes": ctx.sizes.to_dict(), "device": ctx.device, "precision": ctx.args.compile_precision}
    row = run_child("compile", payload, left)
    if "reason" in row:
        section["reasons"][name] = row["reason"]
        section.setdefault("tracebacks", {})[name] = row.get("traceback")
    else:
        section["rows"][name] = row


def loop(ctx) -> dict:
    """Section 8: on CUDA the NumPy and CuPy loops on bench-size Unets; else NumPy and ONNX Runtime."""
    from imagen.runtime.errors import NonFiniteError

    from .loop import loop_section

    args = ctx.args
    run_dir, bundle_dir = args.run, args.bundle
    if run_dir is None:
        run_dir, bundle_dir, _ = scaffold(args.work, ctx.sizes, say=ctx.say)
    reasons, xp = {}, None
    why_not = ctx.cuda_reason or cupy_reason()
    if why_not:
        reasons["CuPy loop"] = why_not
    else:
        import array_api_compat.cupy as xp
    precision = args.loop_precision or ("fp32" if ctx.cuda_reason else "fp16")
    options = dict(device=ctx.device, device_namespace=xp, own_unets=ctx.smoke, threads=args.threads, seed=args.seed)
    try:
        section = loop_section(bundle_dir, run_dir, ctx.sizes, precision=precision, say=ctx.say, **options)
    except NonFiniteError as error:
        if precision == "fp32":
            raise
        reasons["FP16 engine"] = f"{error}; measured in FP32 instead"
        section = loop_section(bundle_dir, run_dir, ctx.sizes, precision="fp32", say=ctx.say, **options)
    section["reasons"] = reasons
    return section


def engines(ctx) -> dict:
    """Section 9: a child process when TensorRT or ONNX Runtime's CUDA provider is usable."""
    from .engines import engine_reasons

    every = engine_reasons()
    reasons = {name: reason for name, reason in every.items() if reason is not None}
    left = ctx.budget.left() - 10
    if len(reasons) == len(every):
        return {"rows": {}, "reasons": reasons}
    if left < 90:
        skipped = f"skipped: {max(0.0, left):.0f} s of the budget left"
        return {"rows": {}, "reasons": {name: reason or skipped for name, reason in every.items()}}
    release_gpu_memory()
    ctx.say(f"section 9: export and engines, in a child process (up to {left:.0f} s)")
    out = run_child("engines", {"sizes": ctx.sizes.to_dict(), "work": str(ctx.args.work / "engines")}, left)
    if "reason" in out:
        return {"rows": {}, "reasons": {**reasons, "engines": out["reason"]}, "traceback": out.get("traceback")}
    return out


def release_gpu_memory() -> None:
    """Hands this process's cached GPU memory back before a child process needs it."""
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        import cupy

        cupy.get_default_memory_pool().free_all_blocks()
    except ImportError:
        pass


@dataclasses.dataclass
class Context:
    args: argparse.Namespace
    argv: list
    sizes: Sizes
    device: str
    smoke: bool
    cuda_reason: str | None
    budget: Budget
    results: dict
    pending_compile: bool = False

    def say(self, message: str) -> None:
        print(f"[bench.gpu {self.budget.elapsed():6.1f} s] {message}", file=sys.stderr, flush=True)

    def save(self) -> None:
        self.results["seconds"] = self.budget.elapsed()
        if self.args.json:
            self.args.json.write_text(json.dumps(self.results, indent=2, default=str))


def make_context(args, argv) -> Context:
    reason = cuda_reason()
    smoke = args.smoke or reason is not None
    budget = Budget(args.budget_s or (120.0 if smoke else 420.0))
    sizes = resolve_sizes(args, smoke)
    results = {"argv": argv, "smoke": smoke, "budget_s": budget.seconds, "sizes": sizes.to_dict(), "sections": {}}
    return Context(args, argv, sizes, "cpu" if reason else "cuda", smoke, reason, budget, results)


def measure_section(ctx, number: str, key: str, measure) -> None:
    """One section into the results (its reason when it fails or no budget is left), then the JSON."""
    ctx.say(f"section {number}")
    if ctx.budget.left() < 30:
        ctx.results["sections"][key] = {"reason": f"skipped: {max(0.0, ctx.budget.left()):.0f} s of the budget left"}
    else:
        try:
            ctx.results["sections"][key] = measure(ctx)
        except Exception as error:  # a broken section is reported, the others still run
            ctx.results["sections"][key] = failed(error)
    ctx.save()


def run(args, argv) -> dict:
    """The environment, sections 7 and 8, the compile row (the longest and least predictable), section 9."""
    ctx = make_context(args, argv)
    if ctx.device == "cpu" and args.threads:
        import torch

        torch.set_num_threads(args.threads)
    ctx.results["environment"] = environment()
    ctx.save()
    wanted = [s.strip() for s in args.sections.split(",")]
    for number, key, measure in (("7", "reference", reference), ("8", "loop", loop)):
        if number in wanted:
            measure_section(ctx, number, key, measure)
    if ctx.pending_compile:
        add_compile_row(ctx)
        ctx.save()
    if "9" in wanted:
        measure_section(ctx, "9", "engines", engines)
    ctx.results["targets"] = targets(ctx.results["sections"])
    ctx.save()
    return ctx.results


def targets(sections: dict) -> list[dict]:
    from .engines import speedup_target

    found = [sections.get("loop", {}).get("target")]
    found.append(speedup_target(sections.get("engines", {}), sections.get("reference", {})))
    return [t for t in found if t is not None]


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.child:
        child_main(*args.child)
        return {}
    results = run(args, argv)
    print(render(results), flush=True)
    return results
