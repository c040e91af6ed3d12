"""The benchmark suite of issue 6, measured side by side in one run.

    python -m bench                                   # the demo bundle, every section
    python -m bench --run runs/demo --bundle runtime/demo --out docs/benchmarks.md
    python -m bench --quick --sections 2,5            # tiny sizes and counts (a smoke run)

Sections (one function each, each returning a dict):

1. `reference_vs_runtime`: PyTorch eager reference vs the runtime, same sampler, steps,
   batch and noise: wall time per image and the ratio (target: runtime >= 2.0x faster).
2. `engine_efficiency`: this machine's GEMM rate (NumPy and an ONNX Runtime MatMul), each
   Unet engine's achieved FLOP rate at batch 2 (cond + uncond) as a share of it (target:
   >= 75% for a 64x64, dim 64 base Unet), and ONNX Runtime session options compared on
   that Unet.
3. `outside_engine`: time outside engine calls (tokenizer, NumPy loop, resize, PNG) as a
   share of a request (target: <= 3%).
4. `steps_vs_quality`: `imagen-eval`'s exact-match rate and images/second per sampler and
   step count (target: DPM-Solver++ at 25 steps within 2 points of full DDPM).
5. `memory_and_cold_start`: peak resident memory and cold start (import + load) of the
   runtime, each in a fresh process (targets: <= 400 MB, <= 1.5 s).

With `--out FILE` the Markdown report replaces the part of FILE between
`<!-- bench:start -->` and `<!-- bench:end -->` (or is appended, with the markers, when
FILE has none), so hand-written text around it stays.
"""

import argparse
import datetime
import io
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
START, END = "<!-- bench:start -->", "<!-- bench:end -->"
SECTIONS = (1, 2, 3, 4, 5)
PROMPTS = [
    "a small red circle on the left",
    "a large blue square at the top",
    "a green triangle at the bottom",
    "a small yellow circle on the right",
    "a large red square",
    "a blue triangle on the left",
    "a green circle at the top",
    "a large yellow triangle",
]
# Section 4: (label, sampler, steps); steps None is every timestep of the schedule.
QUALITY_CONFIGS = [
    ("DDPM, all timesteps", "ddpm", None),
    ("DDIM 50", "ddim", 50),
    ("DDIM 25", "ddim", 25),
    ("DPM-Solver++ 25", "dpmpp_2m", 25),
    ("DPM-Solver++ 15", "dpmpp_2m", 15),
    ("DPM-Solver++ 10", "dpmpp_2m", 10),
]


# Machine and small helpers


def physical_cores() -> int:
    """Distinct (physical id, core id) pairs in /proc/cpuinfo among the CPUs this process may use."""
    try:
        allowed = os.sched_getaffinity(0)
    except AttributeError:
        allowed = set(range(os.cpu_count() or 1))
    cores, current = set(), {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return max(1, len(allowed))
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(":", 1) for line in block.splitlines() if ":" in line)
        current = {k.strip(): v.strip() for k, v in fields.items()}
        if "processor" in current and int(current["processor"]) in allowed:
            cores.add((current.get("physical id", "0"), current.get("core id", current["processor"])))
    return max(1, len(cores) or len(allowed))


def machine() -> dict:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        logical = len(os.sched_getaffinity(0))
    except AttributeError:
        logical = os.cpu_count() or 1
    versions = {"python": platform.python_version(), "numpy": np.__version__}
    for name in ("onnxruntime", "torch", "onnx"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = "not installed"
    memory = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                memory = f"{int(line.split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    return {
        "cpu": model,
        "logical_cpus": logical,
        "physical_cores": physical_cores(),
        "memory": memory,
        "os": f"{platform.system()} {platform.release()}",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "versions": versions,
    }


def timed(fn, runs: int, warmup: int = 1) -> dict:
    """Wall seconds of fn() over `runs` calls after `warmup` calls: median, best, all."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, runs)):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"median": statistics.median(times), "best": min(times), "times": times}


class Timed:
    """A proxy of `target` whose `run` (or call) adds its wall time to sink[key]; other
    attributes pass through, so it stands in for a backend, a session or a tokenizer."""

    def __init__(self, target, sink: dict, key: str):
        self._target, self._sink, self._key = target, sink, key
        sink.setdefault(key, 0.0)
        sink.setdefault(f"{key}:calls", 0)

    def __getattr__(self, name):
        return getattr(self._target, name)

    def _time(self, fn, *args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self._sink[self._key] += time.perf_counter() - start
            self._sink[f"{self._key}:calls"] += 1

    def run(self, *args, **kwargs):
        return self._time(self._target.run, *args, **kwargs)

    def __call__(self, *args, **kwargs):
        return self._time(self._target, *args, **kwargs)


@contextmanager
def timing_resize(sink: dict):
    """Times the pipeline's resize_image calls (the module attribute is restored after)."""
    import imagen.runtime.pipeline as pipeline_module

    original = pipeline_module.resize_image
    sink.setdefault("resize", 0.0)

    def resize(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            sink["resize"] += time.perf_counter() - start

    pipeline_module.resize_image = resize
    try:
        yield
    finally:
        pipeline_module.resize_image = original


def load_pipeline(bundle, threads: int):
    from imagen.runtime import Pipeline

    return Pipeline.load(bundle, backend="onnxruntime", threads=threads)


def prompts_for(batch: int) -> list[str]:
    return [PROMPTS[i % len(PROMPTS)] for i in range(batch)]


def unet_feeds(stage, batch: int, rng: np.random.Generator, timesteps: int = 1000) -> dict:
    """Inputs of a runtime StageSpec (or export StageSignature) at `batch`: half the rows
    with text (text_keep), integer times, a partly padded text mask."""
    feeds = {}
    for spec in stage.inputs:
        shape = tuple(batch if d == "batch" else d for d in spec.shape)
        if spec.name == "text_mask":
            feeds[spec.name] = np.arange(shape[1])[None, :] < np.maximum(1, shape[1] // 3)
            feeds[spec.name] = np.repeat(feeds[spec.name], batch, axis=0)
        elif spec.name == "text_keep":
            feeds[spec.name] = np.arange(batch) < max(1, batch // 2)
        elif spec.name in ("time", "lowres_noise_times"):
            feeds[spec.name] = rng.integers(0, timesteps, size=shape).astype(np.float32)
        else:
            feeds[spec.name] = rng.standard_normal(shape, dtype=np.float32)
    return feeds


def ort_session(path, threads: int, level: str = "ALL", mem_pattern: bool = True, sequential: bool = True,
                spinning: bool | None = None, optimized_path: str | None = None, fixed_batch: int | None = None,
                denormal_as_zero: bool = False):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1 if sequential else threads
    options.graph_optimization_level = {
        "DISABLE": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "BASIC": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "EXTENDED": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "ALL": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    options.enable_mem_pattern = mem_pattern
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL if sequential else ort.ExecutionMode.ORT_PARALLEL
    if spinning is not None:
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if optimized_path:
        options.optimized_model_filepath = optimized_path
    if fixed_batch is not None:  # static shapes: the symbolic batch dimension becomes a number
        options.add_free_dimension_override_by_name("batch", fixed_batch)
    if denormal_as_zero:
        options.add_session_config_entry("session.set_denormal_as_zero", "1")
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def default_run_dir(bundle: Path) -> Path | None:
    """The run a bundle came from: runs/demo here or in the repository, else the manifest's source."""
    candidates = [Path("runs/demo"), REPO / "runs" / "demo", REPO.parent / "runs" / "demo"]
    try:
        source = json.loads((bundle / "manifest.json").read_text()).get("source", {}).get("checkpoint")
        if source:
            candidates.append(Path(source))
    except (OSError, ValueError):
        pass
    for candidate in candidates:
        if (candidate / "config.json").is_file():
            return candidate
    return None


# Section 1


def reference_vs_runtime(run_dir, bundle, *, threads: int, sampler=None, steps=None, batch: int = 4,
                         seed: int = 0, repeats: int = 1) -> dict:
    """Wall time per image of the PyTorch eager reference and the runtime, same sampler, steps,
    batch and noise (one Generator(PCG64(seed)) each), plus how far their images differ."""
    if run_dir is None or not Path(run_dir).is_dir():
        return {"skipped": f"no run directory ({run_dir or 'runs/demo'} does not exist); pass --run RUN_DIR, the "
                           "run the bundle was exported from, to compare the reference with the runtime"}
    import torch
    from imagen.reference.checkpoint import load_run

    torch.set_num_threads(threads)
    pipe = load_pipeline(bundle, threads)
    batch = min(batch, pipe.max_batch)
    sampler = sampler or pipe.defaults.get("sampler", "ddpm")
    steps_list = pipe._steps(steps)
    manifest = pipe.manifest.data
    weights = manifest.get("source", {}).get("weights", "latest")
    run = load_run(run_dir, weights)
    source = manifest.get("source", {}).get("checkpoint")
    same_run = source is None or Path(source).resolve() == Path(run_dir).resolve()
    prompts = prompts_for(batch)
    scale = float(pipe.defaults["guidance_scale"])
    sr_strength = pipe._sr_strength(None)

    def reference():
        embeds, mask = run.text_encoder.encode(prompts)
        images = run.imagen.sample(embeds, mask, guidance_scale=scale, sampler=sampler, steps=tuple(steps_list),
                                   sr_strength=sr_strength, noise=np.random.Generator(np.random.PCG64(seed)))
        image = images.numpy()
        return np.floor(np.clip(image, 0, 1) * np.float32(255) + np.float32(0.5)).astype(np.uint8).transpose(
            0, 2, 3, 1)

    def runtime():
        return pipe(prompts, sampler=sampler, steps=steps_list, guidance_scale=scale, sr_strength=sr_strength,
                    seed=seed).array

    # Warm both (allocators, thread pools, first-call graph work) with a short request.
    run.imagen.sample(*run.text_encoder.encode(prompts[:1]), sampler="ddim", steps=1, guidance_scale=scale,
                      noise=np.random.Generator(np.random.PCG64(seed)))
    pipe(prompts[:1], sampler="ddim", steps=1, seed=seed)
    out = {}
    ref_times, rt_times = [], []
    for _ in range(max(1, repeats)):  # interleaved, so slow drift of the machine hits both
        start = time.perf_counter()
        out["reference"] = reference()
        ref_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        out["runtime"] = runtime()
        rt_times.append(time.perf_counter() - start)
    diff = np.abs(out["reference"].astype(np.int16) - out["runtime"].astype(np.int16))
    ref_s, rt_s = min(ref_times), min(rt_times)
    speedup = ref_s / rt_s
    return {
        "config": {"run": str(run_dir), "bundle_source": source, "same_run": same_run, "weights": weights,
                   "sampler": sampler, "steps": steps_list, "sr_strength": sr_strength,
                   "batch": batch, "guidance_scale": scale, "seed": seed, "threads": threads,
                   "repeats": max(1, repeats)},
        "reference_s_per_image": ref_s / batch,
        "runtime_s_per_image": rt_s / batch,
        "speedup": speedup,
        "uint8_max_diff": int(diff.max()),
        "uint8_fraction_over_1": float(np.mean(diff > 1)),
        "target": {"what": "runtime speed-up over the reference", "value": speedup, "unit": "x", "goal": ">= 2.0x",
                   "met": speedup >= 2.0},
    }


# Section 2


def gemm_numpy(n: int, threads: int, runs: int) -> dict:
    """float32 (n x n) @ (n x n) in NumPy, in a subprocess whose BLAS uses `threads` threads."""
    code = (
        "import json, time, numpy as np\n"
        f"n, runs = {n}, {runs}\n"
        "rng = np.random.default_rng(0)\n"
        "a = rng.standard_normal((n, n), dtype=np.float32); b = rng.standard_normal((n, n), dtype=np.float32)\n"
        "a @ b\n"
        "times = []\n"
        "for _ in range(runs):\n"
        "    t = time.perf_counter(); a @ b; times.append(time.perf_counter() - t)\n"
        "print(json.dumps(times))\n"
    )
    env = {**os.environ, **{k: str(threads) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    times = json.loads(result.stdout.strip().splitlines()[-1])
    best = min(times)
    return {"n": n, "threads": threads, "best_s": best, "gflops": 2 * n**3 / best / 1e9}


def gemm_ort(n: int, threads: int, runs: int) -> dict:
    """float32 (n x n) @ (n x n) through an ONNX Runtime MatMul model (B a constant initializer)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    b = rng.standard_normal((n, n), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["A", "B"], ["C"])], "gemm",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [n, n])],
        [helper.make_tensor_value_info("C", TensorProto.FLOAT, [n, n])],
        initializer=[numpy_helper.from_array(b, "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "gemm.onnx"
        onnx.save(model, str(path))
        session = ort_session(path, threads)
    a = rng.standard_normal((n, n), dtype=np.float32)
    result = timed(lambda: session.run(None, {"A": a}), runs)
    return {"n": n, "threads": threads, "best_s": result["best"], "gflops": 2 * n**3 / result["best"] / 1e9}


def build_test_unet(folder: Path, *, dim: int, image_size: int, embed_dim: int, max_length: int) -> dict:
    """The issue's 64x64 base Unet (dim 64, dim_mults (1, 2, 4), attention and cross-attention on
    the lower two levels; random weights) exported to ONNX as a bundle stage would be."""
    import torch
    from imagen.export.onnx_export import UnetStage, count_flops, export_stage
    from imagen.export.signatures import unet_signature
    from imagen.reference.unet import Unet, UnetConfig

    torch.manual_seed(0)
    config = UnetConfig(dim=dim, dim_mults=(1, 2, 4), layer_attns=(False, True, True),
                        layer_cross_attns=(False, True, True), text_embed_dim=embed_dim, max_text_len=max_length,
                        channels=3, channels_out=3, lowres_cond=False)
    module = UnetStage(Unet(config)).eval()
    signature = unet_signature(0, image_size, max_length, embed_dim, False, max_batch=4)
    path = folder / "unet_test.onnx"
    start = time.perf_counter()
    export_stage(module, signature, path, timesteps=1000)
    export_s = time.perf_counter() - start
    flops = count_flops(module, signature, timesteps=1000)
    return {"path": path, "signature": signature, "flops": flops, "export_s": export_s,
            "config": {"dim": dim, "dim_mults": [1, 2, 4], "layer_attns": [False, True, True],
                       "layer_cross_attns": [False, True, True], "image_size": image_size,
                       "text": [max_length, embed_dim]}}


SESSION_VARIANTS = [
    # (label, ort_session keyword arguments (threads None: the benchmark's count), what is
    # expected against ENABLE_ALL and why)
    ("DISABLE_ALL (no graph optimisation)", dict(level="DISABLE"),
     "10-20% slower: no constant folding, no Conv+activation fusion, no NCHWc layout"),
    ("ENABLE_BASIC", dict(level="BASIC"), "5-10% slower: folding, but no NCHWc layout"),
    ("ENABLE_EXTENDED", dict(level="EXTENDED"), "as BASIC: its fusions target transformers"),
    ("ENABLE_ALL (runtime/backends.py now)", dict(level="ALL"), "the reference row"),
    ("ENABLE_ALL, enable_mem_pattern off", dict(level="ALL", mem_pattern=False),
     "within 3%: allocation is a small share at these sizes"),
    ("ENABLE_ALL, parallel execution mode", dict(level="ALL", sequential=False),
     "slower: the graph is a chain and inter-op threads take cores from intra-op work"),
    ("ENABLE_ALL, intra-op spinning off", dict(level="ALL", spinning=False),
     "a few % slower: threads sleep between operators"),
    ("ENABLE_ALL, intra-op threads 1", dict(level="ALL", threads=1), "about 1.9x slower"),
    ("ENABLE_ALL, intra-op threads 2", dict(level="ALL", threads=2), "as ENABLE_ALL (2 cores here)"),
    ("ENABLE_ALL, threads = logical CPUs", dict(level="ALL", threads="logical"), "as ENABLE_ALL (2 here)"),
    ("ENABLE_ALL, batch fixed to 2 (static shapes)", dict(level="ALL", fixed_batch=2),
     "within 3%: only shape arithmetic folds; convolutions dominate"),
    ("ENABLE_ALL, denormals as zero", dict(level="ALL", denormal_as_zero=True),
     "within 3%: weights and activations are far from denormal"),
]


def session_variants(path, feeds: dict, threads: int, runs: int, rounds: int) -> list[dict]:
    """Each SESSION_VARIANTS session on one model; the timed calls are taken round-robin over
    `rounds` rounds (runs / rounds calls per variant per round), so slow drift of a shared
    machine spreads over every variant instead of landing on one."""
    logical = machine()["logical_cpus"]
    entries = []
    for name, options, prediction in SESSION_VARIANTS:
        options = dict(options)
        chosen = options.pop("threads", None)
        count = logical if chosen == "logical" else (chosen or threads)
        start = time.perf_counter()
        session = ort_session(path, count, **options)
        create_s = time.perf_counter() - start
        for _ in range(2):  # warm
            session.run(None, feeds)
        entries.append({"variant": name, "threads": count, "session_create_s": create_s, "session": session,
                        "prediction": prediction, "times": []})
    per_round = max(1, math.ceil(runs / rounds))
    for _ in range(rounds):
        for entry in entries:
            for _ in range(per_round):
                start = time.perf_counter()
                entry["session"].run(None, feeds)
                entry["times"].append(time.perf_counter() - start)
    return [{"variant": e["variant"], "threads": e["threads"], "session_create_s": e["session_create_s"],
             "prediction": e["prediction"],
             "median_s": statistics.median(e["times"]), "best_s": min(e["times"]), "runs": len(e["times"])}
            for e in entries]


def engine_efficiency(bundle, *, threads: int, quick: bool = False, runs: int = 10, gemm_n: int = 2048,
                      test_unet: bool = True) -> dict:
    """GEMM rate, each bundle Unet's achieved FLOP rate at batch 2, the issue's 64x64 dim 64 Unet,
    and ONNX Runtime session options compared on that Unet."""
    from imagen.runtime.bundle import load_manifest

    rng = np.random.default_rng(0)
    gemm_runs = 3 if quick else 5
    gemm = {"numpy": gemm_numpy(gemm_n, threads, gemm_runs), "onnxruntime": gemm_ort(gemm_n, threads, gemm_runs)}
    floor_gflops = max(g["gflops"] for g in gemm.values())
    manifest = load_manifest(bundle)
    unets = []

    def measure(label, path, stage, flops, timesteps):
        feeds = unet_feeds(stage, 2, rng, timesteps)
        session = ort_session(path, threads)
        t = timed(lambda: session.run(None, feeds), runs, warmup=2)
        achieved = 2 * flops / t["median"] / 1e9
        return {"unet": label, "batch": 2, "flops_per_call_batch1": flops, "median_s": t["median"],
                "best_s": t["best"], "achieved_gflops": achieved, "percent_of_gemm": 100 * achieved / floor_gflops,
                "floor_s": 2 * flops / (floor_gflops * 1e9)}

    for stage in manifest.unets:
        flops = int(manifest.data["stages"][stage.name].get("flops") or 0)
        timesteps = manifest.schedules[stage.name].num_timesteps
        label = f"{stage.name} ({stage.image_size}x{stage.image_size}, bundle)"
        if flops <= 0:
            unets.append({"unet": label, "skipped": "the manifest has no flops for this stage"})
            continue
        unets.append(measure(label, stage.path, stage, flops, timesteps))
    variants, test = [], None
    if test_unet:
        size, dim = (32, 16) if quick else (64, 64)
        with tempfile.TemporaryDirectory() as folder:
            test = build_test_unet(Path(folder), dim=dim, image_size=size, embed_dim=manifest.embed_dim,
                                   max_length=manifest.max_length)
            label = f"issue's base Unet ({size}x{size}, dim {dim}, random weights)"
            row = measure(label, test["path"], test["signature"], test["flops"], 1000)
            row["target"] = not quick
            unets.append(row)
            feeds = unet_feeds(test["signature"], 2, rng)
            variants = session_variants(test["path"], feeds, threads, runs=max(3, runs // 2 if quick else runs),
                                        rounds=2 if quick else 3)
            for v in variants:
                v["percent_of_gemm"] = 100 * 2 * test["flops"] / v["median_s"] / 1e9 / floor_gflops
    result = {"threads": threads, "gemm": gemm, "floor_gflops": floor_gflops, "unets": unets,
              "session_variants": variants}
    if test is not None:
        result["test_unet"] = {k: v for k, v in test.items() if k in ("flops", "export_s", "config")}
        best = min(variants, key=lambda v: v["median_s"])
        result["best_variant"] = best["variant"]
        percent = next(u for u in unets if u.get("target") is not None)["percent_of_gemm"]
        result["target"] = {"what": "issue's 64x64 dim 64 Unet at batch 2, % of GEMM rate"
                                    + (" (quick mode: a smaller Unet, not the target)" if quick else ""),
                            "value": percent, "unit": "%", "goal": ">= 75%", "met": percent >= 75}
    return result


# Section 3


def outside_engine(bundle, *, threads: int, sampler=None, steps=None, batch: int = 4, seed: int = 0,
                   repeats: int = 1) -> dict:
    """One request, every engine call timed: the time outside engine calls as a share of the
    request including PNG encoding, split into tokenizer, resize, backend wrapper, PNG, NumPy loop."""
    pipe = load_pipeline(bundle, threads)
    batch = min(batch, pipe.max_batch)
    prompts = prompts_for(batch)
    pipe(prompts[:1], sampler="ddim", steps=1, seed=seed)  # warm
    sink: dict = {}
    for name, backend in list(pipe.backends.items()):
        if hasattr(backend, "session"):
            backend.session = Timed(backend.session, sink, f"engine:{name}")
        pipe.backends[name] = Timed(backend, sink, f"backend:{name}")
    pipe.tokenizer = Timed(pipe.tokenizer, sink, "tokenizer")
    best = None
    for _ in range(max(1, repeats)):
        for key in sink:
            sink[key] = 0 if key.endswith(":calls") else 0.0
        sink["png"] = 0.0
        with timing_resize(sink):
            start = time.perf_counter()
            result = pipe(prompts, sampler=sampler, steps=steps, seed=seed)
            request = time.perf_counter() - start
            png_start = time.perf_counter()
            for image in result.images:
                image.save(io.BytesIO(), format="PNG")
            sink["png"] = time.perf_counter() - png_start
        total = request + sink["png"]
        if best is None or total < best[0]:
            best = (total, request, dict(sink))
    total, request, sink = best
    engine_keys = [k for k in sink if k.startswith("engine:") and not k.endswith(":calls")]
    backend_keys = [k for k in sink if k.startswith("backend:") and not k.endswith(":calls")]
    engine = sum(sink[k] for k in engine_keys) if engine_keys else sum(sink[k] for k in backend_keys)
    backend = sum(sink[k] for k in backend_keys)
    parts = {
        "engine calls (session.run)": engine,
        "backend wrapper (feed checks)": max(0.0, backend - engine) if engine_keys else 0.0,
        "tokenizer": sink.get("tokenizer", 0.0),
        "resize": sink.get("resize", 0.0),
        "PNG encoding": sink["png"],
    }
    parts["NumPy loop and the rest"] = max(0.0, total - sum(parts.values()))
    outside = total - engine
    share = 100 * outside / total
    return {
        "config": {"sampler": result.info[0]["sampler"], "steps": result.info[0]["steps"],
                   "sr_strength": result.info[0]["sr_strength"], "batch": batch,
                   "threads": threads, "seed": seed},
        "total_s": total,
        "engine_s": engine,
        "outside_s": outside,
        "outside_percent": share,
        "engine_calls": {k.split(":", 1)[1]: sink[f"{k}:calls"] for k in (engine_keys or backend_keys)},
        "parts": {k: {"seconds": v, "percent": 100 * v / total} for k, v in parts.items()},
        "target": {"what": "time outside engine calls, share of a request", "value": share, "unit": "%",
                   "goal": "<= 3%", "met": share <= 3.0},
    }


# Section 4


def steps_vs_quality(bundle, *, threads: int, n: int = 48, batch: int = 8, split: str = "train",
                     seed: int = 0) -> dict:
    """imagen-eval's exact-match rate and images/second per sampler and step count (steps
    beyond the schedule's timesteps are capped to it)."""
    from imagen.shapes.evaluate import evaluate

    pipe = load_pipeline(bundle, threads)
    batch = min(batch, pipe.max_batch)
    total = min(pipe.manifest.schedules[f"unet_{i}"].num_timesteps for i in range(pipe.num_unets))
    pipe(prompts_for(1), sampler="ddim", steps=1, seed=seed)  # warm
    rows = []
    for label, sampler, steps in QUALITY_CONFIGS:
        # Explicit steps: None would mean the bundle's default steps, not every timestep.
        used = total if steps is None else min(steps, total)
        report = evaluate(pipe, split, n, batch_size=batch, seed=seed, sampler=sampler, steps=used)
        rows.append({"config": label, "sampler": sampler, "steps": used,
                     "capped": steps is not None and steps > total, "exact": report["accuracy"]["exact"],
                     "accuracy": {k: v for k, v in report["accuracy"].items() if k != "exact"},
                     "images_per_second": report["images_per_second"]})
    ddpm = rows[0]["exact"]
    dpm25 = next(r for r in rows if r["config"] == "DPM-Solver++ 25")["exact"]
    gap = 100 * (ddpm - dpm25)
    return {"config": {"n": n, "batch": batch, "split": split, "seed": seed, "threads": threads,
                       "timesteps": total, "sr_strength": pipe._sr_strength(None)},
            "rows": rows,
            "target": {"what": "DPM-Solver++ 25 exact-match, points below full DDPM", "value": gap, "unit": " points",
                       "goal": "<= 2 points", "met": gap <= 2.0}}


# Section 5

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
    result = subprocess.run([sys.executable, "-c", _CHILD, str(bundle), str(threads), str(images), sampler,
                             str(steps)], env=env, capture_output=True, text=True, cwd=tempfile.gettempdir())
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"benchmark subprocess failed: {result.stderr.strip()[-2000:]}")
    line = next(line for line in result.stdout.splitlines() if line.startswith("BENCH"))
    return {**json.loads(line[len("BENCH"):]), "process_wall_s": wall}


def memory_and_cold_start(bundle, *, threads: int, repeats: int = 5, steps: int = 10) -> dict:
    """Cold start (import imagen.runtime + Pipeline.load) in fresh processes, and the peak RSS
    of a fresh process that loads and generates one image (and a max-batch request)."""
    from imagen.runtime.bundle import load_manifest

    max_batch = load_manifest(bundle).max_batch
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
            {"what": "peak RSS, load + one image", "value": peak_mb, "unit": " MB", "goal": "<= 400 MB",
             "met": peak_mb <= 400},
            {"what": "cold start (import + load), median", "value": cold_median, "unit": " s", "goal": "<= 1.5 s",
             "met": cold_median <= 1.5},
        ],
    }


# Report


def _fmt(value, digits: int = 3) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value == 0 or 1e-3 <= abs(value) < 1e5:
            return f"{value:.{digits}g}" if abs(value) < 1 else f"{value:,.{max(0, digits - 1)}f}".rstrip("0").rstrip(
                ".")
        return f"{value:.2e}"
    return str(value)


def _table(columns: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return lines + [""]


def _targets(section: dict) -> list[dict]:
    return section.get("targets") or ([section["target"]] if "target" in section else [])


def render(results: dict) -> str:
    info = results["machine"]
    v = info["versions"]
    lines = [
        f"## Run of {info['date']}{' (quick mode)' if results['quick'] else ''}",
        "",
        f"Machine: {info['cpu']}, {info['physical_cores']} physical cores / {info['logical_cpus']} logical CPUs, "
        f"{info['memory']} RAM, {info['os']}. Python {v['python']}, numpy {v['numpy']}, onnxruntime "
        f"{v['onnxruntime']}, torch {v['torch']}, onnx {v['onnx']}.",
        "",
        f"Bundle: `{results['bundle']}`; run: `{results['run']}`; threads: {results['threads']}; "
        f"command: `python -m bench {' '.join(results['argv'])}`; took {results['seconds']:.0f} s.",
        "",
    ]
    summary = []
    for key, title in (("1", "Reference vs runtime"), ("2", "Unet engine vs GEMM floor"),
                       ("3", "Time outside engine calls"), ("4", "Steps vs quality"), ("5", "Memory and cold start")):
        section = results["sections"].get(key)
        if section is None:
            continue
        if "skipped" in section:
            summary.append([f"{key}. {title}", "skipped", "", ""])
        for t in _targets(section):
            summary.append([f"{key}. {t['what']}", _fmt(t["value"]) + t.get("unit", ""), t["goal"], t["met"]])
    lines += ["### Targets", ""] + _table(["section", "measured", "target", "met"], summary)
    s = results["sections"]
    if "1" in s:
        lines += ["### 1. Reference (PyTorch eager) vs runtime", ""]
        if "skipped" in s["1"]:
            lines += [f"Skipped: {s['1']['skipped']}.", ""]
        else:
            r, c = s["1"], s["1"]["config"]
            lines += [f"Same sampler ({c['sampler']}), steps {c['steps']}, sr_strength "
                      f"{c.get('sr_strength', 1.0)}, batch {c['batch']}, guidance "
                      f"{c['guidance_scale']}, noise (PCG64 seed {c['seed']}); {c['threads']} threads on both "
                      f"sides; best of {c['repeats']}. Images differ by at most {r['uint8_max_diff']} uint8 levels "
                      f"({r['uint8_fraction_over_1']:.3%} of values by more than 1).", ""]
            if not c["same_run"]:
                lines += [f"Note: the bundle was exported from `{c['bundle_source']}`, not `{c['run']}`; if their "
                          "weights differ, so do the images (the timings still compare).", ""]
            lines += _table(["", "s / image"], [["reference (PyTorch eager)", r["reference_s_per_image"]],
                                                ["runtime (ONNX Runtime + NumPy)", r["runtime_s_per_image"]],
                                                ["speed-up", r["speedup"]]])
    if "2" in s:
        r = s["2"]
        g = r["gemm"]
        lines += ["### 2. Unet engine time vs the GEMM floor", "",
                  f"GEMM rate, float32 {g['numpy']['n']}x{g['numpy']['n']} matrix product, best of several, "
                  f"{r['threads']} threads: NumPy {g['numpy']['gflops']:.1f} GFLOP/s, ONNX Runtime MatMul "
                  f"{g['onnxruntime']['gflops']:.1f} GFLOP/s; the floor uses {r['floor_gflops']:.1f} GFLOP/s. "
                  "Unet FLOPs are the manifest's (2 x multiply-adds of one call at batch 1) x 2 rows; times are "
                  "medians.", ""]
        rows = []
        for u in r["unets"]:
            if "skipped" in u:
                rows.append([u["unet"], "skipped", "", "", "", ""])
            else:
                rows.append([u["unet"], u["flops_per_call_batch1"] / 1e9, u["median_s"] * 1e3, u["floor_s"] * 1e3,
                             u["achieved_gflops"], f"{u['percent_of_gemm']:.1f}%"])
        lines += _table(["Unet, batch 2", "GFLOP / call (batch 1)", "engine ms", "floor ms", "GFLOP/s",
                         "% of GEMM"], rows)
        if r["session_variants"]:
            lines += ["ONNX Runtime session options on the issue's Unet (batch 2; the timed calls are taken "
                      "round-robin over the variants, so drift of the machine spreads over all of them):", ""]
            reference = next((v for v in r["session_variants"] if v["variant"].startswith("ENABLE_ALL (")),
                             r["session_variants"][0])
            lines += _table(["variant", "expected", "threads", "median ms", "vs ENABLE_ALL", "best ms",
                             "% of GEMM (median)", "session create s"],
                            [[v["variant"], v.get("prediction", ""), v["threads"], v["median_s"] * 1e3,
                              f"{100 * (v['median_s'] / reference['median_s'] - 1):+.1f}%", v["best_s"] * 1e3,
                              f"{v['percent_of_gemm']:.1f}%", v["session_create_s"]] for v in r["session_variants"]])
            lines += [f"Fastest: {r['best_variant']}.", ""]
    if "3" in s:
        r, c = s["3"], s["3"]["config"]
        lines += ["### 3. Time outside engine calls", "",
                  f"One request of {c['batch']} images, {c['sampler']} {c['steps']} steps, sr_strength "
                  f"{c.get('sr_strength', 1.0)}, {c['threads']} threads, "
                  f"PNG encoding included; {sum(r['engine_calls'].values())} engine calls.", ""]
        lines += _table(["part", "s", "% of total"],
                        [[k, p["seconds"], f"{p['percent']:.2f}%"] for k, p in r["parts"].items()]
                        + [["total", r["total_s"], "100%"],
                           ["outside engine calls", r["outside_s"], f"{r['outside_percent']:.2f}%"]])
    if "4" in s:
        r, c = s["4"], s["4"]["config"]
        lines += ["### 4. Steps vs quality", "",
                  f"`imagen-eval` on {c['n']} `{c['split']}` captions (seed {c['seed']}), batch {c['batch']}, "
                  f"{c['threads']} threads; the schedule has {c['timesteps']} timesteps. Every row uses the "
                  f"bundle's sr_strength ({c.get('sr_strength', 1.0)}): the super-resolution Unet runs that share "
                  "of its steps.", ""]
        lines += _table(["sampler", "steps / Unet", "exact match", "images / s"],
                        [[row["config"], f"{row['steps']}{' (capped)' if row['capped'] else ''}",
                          f"{100 * row['exact']:.1f}%", row["images_per_second"]] for row in r["rows"]])
    if "5" in s:
        r = s["5"]
        lines += ["### 5. Peak memory and cold start", "",
                  f"Fresh processes, {r['config']['threads']} threads; cold start = `import imagen.runtime` + "
                  f"`Pipeline.load` (median of {r['config']['repeats']}; the first run "
                  f"{r['cold_start_s']['first']:.3f} s); torch imported: {_fmt(r['torch_imported'])}. Peak RSS is "
                  f"the process's VmHWM after generating ({r['config']['generate']}).", ""]
        lines += _table(["measure", "value"], [
            ["import imagen.runtime (s)", r["import_s"]], ["Pipeline.load (s)", r["load_s"]],
            ["cold start, import + load (s)", r["cold_start_s"]["median"]],
            ["whole process incl. interpreter start (s)", r["process_wall_s"]],
            ["peak RSS, load + 1 image (MB)", r["peak_rss_mb_one_image"]],
            [f"peak RSS, load + {r['max_batch']} images (MB)", r["peak_rss_mb_max_batch"]]])
    return "\n".join(lines).rstrip() + "\n"


def write_report(path: Path, text: str) -> None:
    """Replaces the text between the bench markers in `path` (creating the file if needed)."""
    path = Path(path)
    block = f"{START}\n{text.rstrip()}\n{END}"
    if path.exists():
        old = path.read_text()
        if START in old and END in old and old.index(START) < old.index(END):
            new = old[:old.index(START)] + block + old[old.index(END) + len(END):]
        else:
            new = old.rstrip() + "\n\n" + block + "\n"
    else:
        new = ("# Benchmarks\n\nMeasured with `python -m bench` (bench/run.py; issue 6). The section between "
               "the markers is rewritten by each run with `--out`.\n\n" + block + "\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new)


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=None,
                        help="bundle folder (default: the package's demo bundle, runtime/demo)")
    parser.add_argument("--run", type=Path, default=None,
                        help="the run directory the bundle was exported from, for section 1 (default: runs/demo; "
                             "section 1 is skipped when there is none)")
    parser.add_argument("--sections", default="1,2,3,4,5", help="comma-separated sections to run (default: all)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and counts (a smoke run, not a benchmark)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for every engine and for torch (default: physical cores)")
    parser.add_argument("--sampler", default=None, help="sections 1 and 3: sampler (default: the bundle's)")
    parser.add_argument("--steps", type=int, default=None, help="sections 1 and 3: steps per Unet (default: the "
                                                                  "bundle's, i.e. all timesteps)")
    parser.add_argument("--batch", type=int, default=4, help="sections 1 and 3: images per request (default 4)")
    parser.add_argument("--n", type=int, default=None, help="section 4: images per sampler (default 48, quick 4)")
    parser.add_argument("--split", default="train", choices=["train", "heldout"], help="section 4: caption split")
    parser.add_argument("--runs", type=int, default=None, help="section 2: timed engine calls (default 10, quick 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the Markdown report into this file "
                                                                 "(e.g. docs/benchmarks.md), between the bench markers")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw results as JSON")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    wanted = sorted({int(s) for s in args.sections.split(",") if s.strip()})
    unknown = [s for s in wanted if s not in SECTIONS]
    if unknown:
        raise SystemExit(f"unknown sections {unknown}; choose from {list(SECTIONS)}")
    if args.bundle is None:
        from imagen.runtime.pipeline import DEMO_BUNDLE

        args.bundle = DEMO_BUNDLE
    bundle = Path(args.bundle)
    if not (bundle / "manifest.json").is_file():
        raise SystemExit(f"{bundle} is not a bundle (no manifest.json); pass --bundle BUNDLE_DIR")
    run_dir = args.run if args.run is not None else default_run_dir(bundle)
    threads = args.threads or physical_cores()
    quick = args.quick
    n = args.n or (4 if quick else 48)
    runs = args.runs or (3 if quick else 10)
    # Sections 1 and 3: the bundle's defaults unless told; quick mode keeps them short.
    sampler = args.sampler or ("ddim" if quick else None)
    steps = args.steps or (3 if quick else None)
    batch = min(args.batch, 2) if quick else args.batch
    started = time.perf_counter()
    results = {"machine": machine(), "bundle": str(bundle), "run": str(run_dir) if run_dir else None,
               "threads": threads, "quick": quick, "argv": argv, "sections": {}}

    def say(message):
        print(f"[bench {time.perf_counter() - started:6.1f} s] {message}", file=sys.stderr, flush=True)

    for section in wanted:
        say(f"section {section}")
        if section == 1:
            out = reference_vs_runtime(run_dir, bundle, threads=threads, sampler=sampler, steps=steps, batch=batch,
                                       seed=args.seed, repeats=1 if quick else 5)
        elif section == 2:
            out = engine_efficiency(bundle, threads=threads, quick=quick, runs=runs, gemm_n=256 if quick else 2048)
        elif section == 3:
            out = outside_engine(bundle, threads=threads, sampler=sampler, steps=steps, batch=batch, seed=args.seed,
                                 repeats=1 if quick else 2)
        elif section == 4:
            out = steps_vs_quality(bundle, threads=threads, n=n, batch=8, split=args.split, seed=args.seed)
        else:
            out = memory_and_cold_start(bundle, threads=threads, repeats=1 if quick else 5, steps=2 if quick else 10)
        results["sections"][str(section)] = out
        if "skipped" in out:
            say(f"section {section} skipped: {out['skipped']}")
    results["seconds"] = time.perf_counter() - started
    text = render(results)
    print(text)
    if args.out:
        write_report(args.out, text)
        say(f"report written to {args.out}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return results


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
