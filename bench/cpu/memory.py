"""Section 5: peak resident memory and cold start of the runtime, each in a fresh process so
nothing the bench itself imported (torch, onnx) is counted. Targets: <= 400 MB for load + one
image, <= 1.5 s for import + load."""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

TARGET_MB, TARGET_COLD_START_S = 400, 1.5

# Runs in a fresh interpreter: argv = bundle, threads, images, sampler, steps.
_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import imagen.runtime
t1 = time.perf_counter()
pipe = imagen.runtime.Pipeline.load(sys.argv[1], backend="onnxruntime", threads=int(sys.argv[2]))
t2 = time.perf_counter()
out = {"import_s": t1 - t0, "load_s": t2 - t1, "torch_imported": "torch" in sys.modules}
images = int(sys.argv[3])
if images:
    prompts = ["a small red circle on the left"] * images
    pipe(prompts, sampler=sys.argv[4], steps=int(sys.argv[5]), seed=0)
    status = open("/proc/self/status").read().split("\n")
    field = {line.split(":")[0]: line.split(":")[1].split() for line in status if ":" in line}
    if "VmHWM" in field:
        out["peak_rss_bytes"] = int(field["VmHWM"][0]) * 1024
    else:
        import resource
        out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print("BENCH" + json.dumps(out))
"""


def _child(bundle, threads: int, images: int = 0, sampler: str = "dpmpp_2m", steps: int = 10) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, str(bundle), str(threads), str(images), sampler, str(steps)],
        env=env,
        capture_output=True,
        text=True,
        cwd=tempfile.gettempdir(),
    )
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"benchmark subprocess failed: {result.stderr.strip()[-2000:]}")
    line = next(line for line in result.stdout.splitlines() if line.startswith("BENCH"))
    return {**json.loads(line[len("BENCH") :]), "process_wall_s": wall}


def memory_and_cold_start(bundle, *, threads: int, repeats: int = 5, steps: int = 10) -> dict:
    """Cold start (import imagen.runtime + Pipeline.load) in fresh processes, and the peak RSS
    of a fresh process that loads and generates one image (and a max-batch request)."""
    from imagen.runtime.bundle import load_bundle

    max_batch = load_bundle(bundle).max_batch
    starts = [_child(bundle, threads) for _ in range(max(1, repeats))]
    cold = [s["import_s"] + s["load_s"] for s in starts]
    one = _child(bundle, threads, images=1, steps=steps)
    full = _child(bundle, threads, images=max_batch, steps=steps)
    cold_median = statistics.median(cold)
    peak_mb = one["peak_rss_bytes"] / 1e6
    return {
        "config": {"threads": threads, "repeats": len(starts), "generate": f"dpmpp_2m, {steps} steps"},
        "cold_start_s": {"first": cold[0], "median": cold_median, "best": min(cold)},
        "import_s": statistics.median(s["import_s"] for s in starts),
        "load_s": statistics.median(s["load_s"] for s in starts),
        "process_wall_s": statistics.median(s["process_wall_s"] for s in starts),
        "torch_imported": any(s["torch_imported"] for s in starts),
        "peak_rss_mb_one_image": peak_mb,
        "peak_rss_mb_max_batch": full["peak_rss_bytes"] / 1e6,
        "max_batch": max_batch,
        "targets": [
            {
                "what": "peak RSS, load + one image",
                "value": peak_mb,
                "unit": " MB",
                "goal": f"<= {TARGET_MB} MB",
                "met": peak_mb <= TARGET_MB,
            },
            {
                "what": "cold start (import + load), median",
                "value": cold_median,
                "unit": " s",
                "goal": f"<= {TARGET_COLD_START_S} s",
                "met": cold_median <= TARGET_COLD_START_S,
            },
        ],
    }
