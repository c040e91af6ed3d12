"""CPU engines and precision side by side: the runtime's ONNX Runtime FP32 and OpenVINO (FP32, bf16),
OpenVINO with its own defaults, and PyTorch (eager, torch.compile, torch.compile under bf16 autocast),
on the same Unet and weights; then the demo cascade end to end at today's FP32 and at
`--precision auto` (docs/cpu-backends.md).

    python -m bench.cpu.precision                       # prints the CPU, the peers' versions and the tables
    python -m bench.cpu.precision --quick               # a 32x32 dim-16 Unet, short requests (a smoke run)
    python -m bench.cpu.precision --json out.json --no-compile

1. Engines: the 64x64 dim-64 base Unet of bench section 2 (random weights, exported as a bundle stage)
   at batch 2 (one image, cond + uncond rows), median ms per call (blocks of calls per engine, two
   passes), and each
   one's relative error to ONNX Runtime FP32. Targets: the runtime's bf16 engine at least as fast as
   OpenVINO's defaults alone (`core.compile_model(path, "CPU")`: its own precision, dynamic batch), and
   >= 1.3x faster than torch.compile under CPU bf16 autocast.
2. End to end: the demo bundle at its default settings, 8 images per request (a full batch, as
   imagen-serve runs them) and 1, images/s of Pipeline.load(precision="fp32") (today's) and
   precision="auto" (what auto chose here, and why), and every Unet in bf16 (`--precision bf16`, for
   comparison), best of interleaved rounds; and the share of a request spent outside engine calls.
   Targets: >= 1.4x at 8 images, >= 1.0x at 1, outside <= 3% at 8.

The auto pipeline measures (or reads from the user's cache) its choice at load, as a user's does.
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ..machine import machine, physical_cores
from ..markdown import table
from ..prompts import prompts_for
from .timing import interleaved

TARGET_UNET, QUICK_UNET = (64, 64), (32, 16)  # (image size, dim)
BATCH = 2
TARGETS = {"vs_openvino_default": 1.0, "vs_compile_bf16": 1.3, "end_to_end_full": 1.4, "end_to_end_one": 1.0}
TARGET_OUTSIDE_PERCENT = 3.0
FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def versions() -> dict:
    out = {}
    for name in ("onnxruntime", "openvino", "torch", "numpy"):
        try:
            out[name] = __import__(name).__version__.split("-")[0]
        except ImportError:
            out[name] = "not installed"
    return out


def cpu() -> dict:
    from imagen.runtime.backends.machine import cpu_flags, native_bf16

    flags = cpu_flags()
    return {"flags": [flag for flag in FLAGS if flag in flags], "native_bf16": native_bf16(flags, ())}


def build_unet(folder: Path, size: int, dim: int):
    """The base Unet of bench section 2 (dim_mults (1, 2, 4), attention on the lower two levels, text
    64 x 128), seeded: the torch module and its ONNX file."""
    import torch

    from imagen.export.onnx_export import UnetStage, export_stage
    from imagen.reference.unet import Unet, UnetConfig
    from imagen.runtime.contract import unet_signature

    torch.manual_seed(0)
    config = UnetConfig(
        dim=dim,
        dim_mults=(1, 2, 4),
        layer_attns=(False, True, True),
        layer_cross_attns=(False, True, True),
        text_embed_dim=128,
        max_text_len=64,
        channels=3,
        channels_out=3,
        lowres_cond=False,
    )
    module = UnetStage(Unet(config)).eval()
    signature = unet_signature(0, size, 64, 128, False, max_batch=4)
    path = folder / "unet.onnx"
    export_stage(module, signature, path, timesteps=1000)
    return module, signature, path


def blocked_medians(calls: dict, runs: int, passes: int = 2) -> dict:
    """Median seconds of each call: `passes` passes over the calls, each call warmed once and then run
    `runs` times in a block. Blocks, not one call of each in turn: the libraries' thread pools (ONNX
    Runtime's spinning threads, OpenVINO's TBB workers, PyTorch's OpenMP team) slow each other down
    when they alternate call by call."""
    times = {name: [] for name in calls}
    for _ in range(passes):
        for name, call in calls.items():
            call()
            for _ in range(runs):
                start = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def torch_calls(module, feeds: dict, signature, compile_: bool) -> dict:
    """name -> (a call returning the output as NumPy): eager FP32, and with compile_ torch.compile in FP32
    and under CPU bf16 autocast (each compiled on its warm-up call)."""
    import torch

    from imagen.export.onnx_export import to_torch

    inputs = to_torch(feeds, signature)

    def runner(model, autocast: bool):
        def call():
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                return model(*inputs).float().numpy()

        return call

    calls = {"torch eager FP32": runner(module, False)}
    if compile_:
        calls["torch.compile FP32"] = runner(torch.compile(module), False)
        calls["torch.compile, bf16 autocast"] = runner(torch.compile(module), True)
    return calls


def engines(*, quick: bool, threads: int, runs: int, compile_: bool) -> dict:
    """Section 1: every engine on one Unet at batch 2."""
    import openvino
    import torch

    from imagen.runtime.backends import OnnxRuntimeBackend, OpenVINOBackend
    from imagen.runtime.backends.choice import relative_error

    torch.set_num_threads(threads)
    size, dim = QUICK_UNET if quick else TARGET_UNET
    with tempfile.TemporaryDirectory() as folder:
        module, signature, path = build_unet(Path(folder), size, dim)
        feeds = signature.sample_inputs(BATCH, np.random.default_rng(0), timesteps=1000)
        # PyTorch first, before the other libraries start their thread pools (which slow its OpenMP team)
        torch_side = torch_calls(module, feeds, signature, compile_)
        outputs = {name: call() for name, call in torch_side.items()}
        medians = blocked_medians(torch_side, max(1, runs // 2))
        ort = OnnxRuntimeBackend(path, signature, None, threads)
        default = openvino.Core().compile_model(str(path), "CPU").create_infer_request()
        ours = {p: OpenVINOBackend(path, signature, p, threads) for p in ("fp32", "bf16")}
        runtime_side = {
            "runtime: onnxruntime FP32": lambda: ort.run(feeds)["noise_pred"],
            "runtime: openvino FP32": lambda: ours["fp32"].run(feeds)["noise_pred"],
            "runtime: openvino bf16": lambda: ours["bf16"].run(feeds)["noise_pred"],
            "openvino defaults alone": lambda: np.array(default.infer(feeds)[0]),
        }
        outputs |= {name: call() for name, call in runtime_side.items()}
        medians |= blocked_medians(runtime_side, max(1, runs // 2))
    reference = outputs["runtime: onnxruntime FP32"]
    names = [*runtime_side, *torch_side]
    errors = {name: relative_error(outputs[name], reference) for name in names}
    rows = [{"engine": n, "ms": 1e3 * medians[n], "rel_error": errors[n]} for n in names]
    ours_s = medians["runtime: openvino bf16"]
    targets = [_target("runtime bf16 vs OpenVINO defaults", medians["openvino defaults alone"] / ours_s, 1.0)]
    if compile_:
        speedup = medians["torch.compile, bf16 autocast"] / ours_s
        targets.append(_target("runtime bf16 vs torch.compile bf16 autocast", speedup, TARGETS["vs_compile_bf16"]))
    return {"unet": {"size": size, "dim": dim, "batch": BATCH}, "rows": rows, "targets": targets}


def _target(what: str, value: float, goal: float) -> dict:
    return {"what": what, "value": value, "goal": f">= {goal:g}x", "met": value >= goal}


def end_to_end(bundle, *, threads: int, repeats: int, steps=None) -> dict:
    """Section 2: the demo cascade, today's FP32 against auto (and every Unet in bf16, `--precision
    bf16`, for comparison), at a full batch and at one image."""
    from imagen.runtime import Pipeline

    pipes = {p: Pipeline.load(bundle, threads=threads, precision=p) for p in ("fp32", "auto")}
    if cpu()["native_bf16"]:  # elsewhere bf16 is refused (emulated, slower than FP32)
        pipes["bf16"] = Pipeline.load(bundle, backend="openvino", threads=threads, precision="bf16")
    full = pipes["fp32"].max_batch
    out = {"chosen": pipes["auto"].choice.reason, "rows": [], "targets": []}
    for images, goal in ((full, TARGETS["end_to_end_full"]), (1, TARGETS["end_to_end_one"])):
        prompts = prompts_for(images)
        for pipe in pipes.values():
            pipe(prompts, steps=1, seed=0)  # warm: thread pools, this batch's allocations (and OpenVINO's shapes)
        calls = {
            p: (lambda pipe=pipe, prompts=prompts: pipe(prompts, steps=steps, seed=0)) for p, pipe in pipes.items()
        }
        best, results = interleaved(calls, repeats)
        for precision, pipe in pipes.items():
            timings = results[precision].info[0]["timings"]
            outside = 100 * (timings["total"] - timings["engine"]) / timings["total"]
            row = {"images": images, "precision": precision, "engine": f"{pipe.backend_name} {pipe.precision}"}
            out["rows"].append(row | {"images_per_s": images / best[precision], "outside_engine_percent": outside})
        speedup = best["fp32"] / best["auto"]
        out["targets"].append(_target(f"auto vs fp32 images/s at {images} image(s)", speedup, goal))
        if images == full:  # a full batch, as imagen-serve runs them
            outside = next(r for r in out["rows"] if r["images"] == images and r["precision"] == "auto")
            outside = outside["outside_engine_percent"]
            out["targets"].append(
                {
                    "what": f"time outside engine calls at {images} images, auto",
                    "value": outside,
                    "goal": f"<= {TARGET_OUTSIDE_PERCENT:g}%",
                    "met": outside <= TARGET_OUTSIDE_PERCENT,
                }
            )
    for pipe in pipes.values():
        pipe.close()
    return out


def render(results: dict) -> str:
    m = results["machine"]
    lines = [
        "### CPU engines and precision",
        "",
        f"{m['cpu']}, {m['logical_cpus']} logical CPUs, {results['threads']} threads; flags "
        f"{' '.join(results['cpu']['flags']) or 'none of note'}; {m['date']}.",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items()) + ".",
        "",
    ]
    e = results["engines"]
    lines += [f"Unet {e['unet']['size']}x{e['unet']['size']} dim {e['unet']['dim']}, batch {e['unet']['batch']}:", ""]
    lines += table(
        ["engine", "ms / call", "rel. error vs ONNX Runtime FP32"],
        [[r["engine"], r["ms"], r["rel_error"]] for r in e["rows"]],
    )
    d = results["end_to_end"]
    lines += [f"Demo cascade end to end; auto chose: {d['chosen']}", ""]
    lines += table(
        ["images / request", "precision", "engine", "images / s", "outside engine calls, %"],
        [[r["images"], r["precision"], r["engine"], r["images_per_s"], r["outside_engine_percent"]] for r in d["rows"]],
    )
    targets = e["targets"] + d["targets"]
    lines += table(["target", "value", "goal", "met"], [[t["what"], t["value"], t["goal"], t["met"]] for t in targets])
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu.precision", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=None, help="bundle for section 2 (default: the demo bundle)")
    parser.add_argument("--quick", action="store_true", help="a small Unet and short requests (a smoke run)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: physical cores)")
    parser.add_argument("--runs", type=int, default=None, help="section 1: timed rounds (default 10, quick 2)")
    parser.add_argument("--repeats", type=int, default=None, help="section 2: rounds (default 3, quick 1)")
    parser.add_argument("--no-compile", action="store_true", help="leave out torch.compile (minutes to compile)")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw results as JSON")
    args = parser.parse_args(argv)
    threads = args.threads or physical_cores()
    started = time.perf_counter()

    def say(message):
        print(f"[precision {time.perf_counter() - started:6.1f} s] {message}", file=sys.stderr, flush=True)

    results = {"machine": machine(), "cpu": cpu(), "versions": versions(), "threads": threads, "quick": args.quick}
    say(f"engines on one Unet (flags: {' '.join(results['cpu']['flags'])})")
    runs = args.runs or (2 if args.quick else 10)
    results["engines"] = engines(quick=args.quick, threads=threads, runs=runs, compile_=not args.no_compile)
    say("the demo cascade end to end")
    repeats = args.repeats or (1 if args.quick else 3)
    results["end_to_end"] = end_to_end(args.bundle, threads=threads, repeats=repeats, steps=2 if args.quick else None)
    say("done")
    print(render(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return results


if __name__ == "__main__":
    main()
