"""Which CPU engine and precision a bundle runs with here: the precision rules, bf16's quality gate,
and `--backend auto`'s measured choice between ONNX Runtime FP32 and OpenVINO bf16.

    precision  onnxruntime        openvino                              auto (CPU)
    fp32       the bundle's ONNX  OpenVINO FP32                         ONNX Runtime: today's images, bit for bit
    bf16       ParameterError     every Unet bf16 (native bf16 only)    as openvino
    auto       as fp32            where native and gated: the base      where native, gated and faster: the base
                                  Unet FP32 then bf16 (split by         Unet on ONNX Runtime FP32 then OpenVINO
                                  timestep), the super-resolution       bf16, the super-resolution Unets on
                                  Unets bf16; else FP32                 OpenVINO bf16; else ONNX Runtime FP32

The text encoder always runs in FP32 (one call per batch; bf16 would buy nothing and lose digits).
"Native" is `machine.native_bf16` (AVX-512 BF16 or AMX): without it OpenVINO converts to bf16 and
back in software, slower than FP32, so `auto` never considers bf16 there and never OpenVINO at all
(OpenVINO FP32 ran at 0.81-0.93x of ONNX Runtime's on an AVX2-only CPU and 0.82-1.01x on the
AVX-512 machine of docs/benchmarks.md), and an explicit bf16 is refused with the fix.

Under `auto` the base Unet runs its noisiest quarter of timesteps (t >= 3/4 T, `switch_time`: the
first 5 of the demo's 20 default steps) in FP32 and the rest in bf16 (`split.SplitBackend`); the
super-resolution Unets run bf16. It is a margin, not a measured need: bf16 blurs what guidance
amplifies, the difference between the base Unet's text and null-text outputs (9e-2 relative on the
demo, whose outputs are within 5.4e-3), and in the noisiest steps an error in the predicted noise
weighs most on the predicted image (multiplied by sqrt((1 - alpha_bar_t) / alpha_bar_t): 25 to 175
over the demo's first quarter, below 16 after). On the demo itself, paired with FP32 at n = 384 per
split (docs/cpu-backends.md), auto's split and every Unet in bf16 both lose 0.0 points of exact match
on training captions and 0.8 on held-out ones, within the 2-point gate; the split runs at 1.5 times
FP32's images/s, every Unet in bf16 at 1.8. (Read with the analyser's earlier bounding-box rule,
which misread squares, every Unet in bf16 looked 2.3 points worse on training captions.) A base Unet
sampled from a table of continuous times (imagen-pytorch's) stays FP32 under auto: the split was
measured on discrete schedules only. `--precision bf16` runs every Unet in bf16.
`auto_plan` says which Unets `auto` may run in bf16, and how.

The gate: per Unet, OpenVINO bf16 against ONNX Runtime FP32 on the stage's sample inputs
(`StageSignature.sample_inputs` at batch 2 and at the stage's largest batch), measured as
`relative_error`; bf16 passes when every candidate Unet is within `GATE` (3e-2). bf16 keeps 8
significant bits (unit roundoff 2^-8, 8x FP16's), so FP16's 1e-2 export tolerance is too tight for
it; measured: 5.4e-3 and 8.1e-3 on the demo's Unets, 2.8e-2 on the 64x64 dim-64 Unet with random
weights. The timing: both engines on the same inputs, interleaved, weighted by each Unet's calls at
the bundle's default settings; bf16 is chosen only when the Unets' time as a whole is lower at
batch 2 (one image) and at the largest batch (a full server batch). Gate and timings are measured
once per machine, bundle and thread count and kept as JSON in the user's cache folder
(machine.cache_root); an unreadable or stale entry is measured again and replaced (written under a
temporary name, then renamed).
"""

import functools
import json
import math
import statistics
import time
from dataclasses import dataclass, field

import numpy as np

from imagen._io import atomic_write

from ..errors import BackendError, ParameterError
from .machine import cache_folder, cpu_flags, machine_key, native_bf16
from .onnxruntime import OnnxRuntimeBackend, default_threads
from .openvino import (
    OpenVINOBackend,
    import_openvino,
    openvino_cache_dir,
    openvino_capabilities,
    openvino_installed,
    openvino_version,
)

PRECISIONS = ("auto", "fp32", "bf16")
PRECISION_HELP = (
    "The Unets' inference precision on the CPU: fp32 (with --backend auto, ONNX Runtime's exact images), "
    "bf16 (OpenVINO, CPUs with AVX-512 BF16 or AMX), or auto: where the CPU has bf16, the Unets pass the "
    "quality gate and it was measured faster here, the super-resolution Unets in bf16 and the base Unet in fp32 "
    "for its noisiest quarter of timesteps, bf16 after; else fp32."
)
GATE = 3e-2
FP32_SHARE = 0.25  # of the base Unet's timesteps, the noisiest, that auto keeps in FP32
TIMED_CALLS, TIME_BUDGET_S = 3, 2.0  # timed calls per engine and batch, fewer past the budget
ENTRY_FORMAT = 1
ENGINES = ("onnxruntime", "openvino_bf16")  # the two timed, the reference first


@dataclass(frozen=True)
class Choice:
    """What runs here: `backend` (every stage's engine), `precision` (the Unets' inference precision;
    the text encoder's is FP32), `reason` (one line: what and why) and `gate` (bf16's quality gate
    where it was measured: threshold, each Unet's relative error, the Unets it applies to, passed).

    `unets` is set where the Unets differ: (engine, precision) per Unet in cascade order. A Unet split
    by timestep names both, FP32's first ("onnxruntime>openvino", "fp32>bf16": its noisiest timesteps
    on ONNX Runtime FP32, the rest on OpenVINO bf16). Then `backend` or `precision`, where they differ
    between Unets, name one per Unet joined by "/" ("onnxruntime>openvino/openvino",
    "fp32>bf16/bf16"), and the text encoder runs in FP32 on the base Unet's first engine."""

    backend: str
    precision: str
    reason: str
    gate: dict | None = field(default=None, compare=False)
    unets: tuple[tuple[str, str], ...] = ()

    def engine(self, index: int) -> tuple[str, str]:
        """(engine, precision) of the Unet at cascade position `index` (0: the base Unet)."""
        return self.unets[index] if self.unets else (self.backend, self.precision)

    def phases(self, index: int) -> list[tuple[str, str]]:
        """(engine, precision) of the Unet at `index`: one, or two for a Unet split by timestep (the
        one for its noisiest timesteps first)."""
        engine, precision = self.engine(index)
        engines, precisions = engine.split(">"), precision.split(">")
        return [(engines[min(i, len(engines) - 1)], p) for i, p in enumerate(precisions)]

    @property
    def engines(self) -> set[str]:
        pairs = self.unets or ((self.backend, self.precision),)
        return {name for engine, _ in pairs for name in engine.split(">")}


def check_precision(backend: str, precision: str) -> None:
    """ParameterError for a precision that is not one of PRECISIONS, or bf16 on an engine without it."""
    if precision not in PRECISIONS:
        raise ParameterError("precision", f"one of {', '.join(PRECISIONS)}", precision)
    if precision == "bf16" and backend in ("onnxruntime", "tensorrt"):
        raise ParameterError(
            "precision",
            f"fp32 or auto with --backend {backend}, which runs the bundle as exported (bf16 runs on OpenVINO: "
            "--backend openvino or auto)",
            precision,
        )


def relative_error(a, b) -> float:
    """||a - b|| / ||b|| in float64 (||a - b|| when b is zero; inf when a has non-finite values), the
    measure export's parity checks use."""
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if not np.isfinite(a64).all():
        return float("inf")
    denominator = np.linalg.norm(b64)
    return float(np.linalg.norm(a64 - b64) / (denominator if denominator > 0 else 1.0))


def one_line(error: Exception, limit: int = 300) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def has_native_bf16() -> bool:
    flags = cpu_flags()
    return native_bf16(flags, () if flags or not openvino_installed() else openvino_capabilities())


def measurement_feeds(bundle, stage, batch: int, seed: int) -> dict:
    """A Unet's sample inputs at `batch`: integer timesteps of its schedule, or its table's time range."""
    table = getattr(stage.how_sampled, "table", None)
    if table is not None:
        times = table["time"]
        kwargs = {"time_range": (min(times), max(times))}
    else:
        kwargs = {"timesteps": bundle.schedules[stage.name].num_timesteps}
    return stage.signature.sample_inputs(batch, np.random.default_rng(seed), **kwargs)


def _timed(engines: dict, feeds: dict) -> tuple[dict, dict]:
    """Each engine's outputs (the warm-up call) and median seconds per call, calls interleaved."""
    outputs = {name: engine.run(feeds) for name, engine in engines.items()}
    times, start = {name: [] for name in engines}, time.perf_counter()
    for _ in range(TIMED_CALLS):
        for name, engine in engines.items():
            began = time.perf_counter()
            engine.run(feeds)
            times[name].append(time.perf_counter() - began)
        if time.perf_counter() - start > TIME_BUDGET_S:
            break
    return outputs, {name: statistics.median(values) for name, values in times.items()}


def measure(bundle, threads: int) -> dict:
    """Gate and timings of every Unet: a new cache entry (`entry_key` plus "gate" and "timings")."""
    cache, gate, timings = openvino_cache_dir(bundle.root), {}, {}
    for stage in bundle.unets:
        path = bundle.path(stage.file)
        engines = {"onnxruntime": OnnxRuntimeBackend(path, stage.signature, None, threads)}
        try:
            engines["openvino_bf16"] = OpenVINOBackend(path, stage.signature, "bf16", threads, cache_dir=cache)
            batches = sorted({min(2, stage.signature.batch_max), stage.signature.batch_max})
            errors, rows = [], {"batch": batches, **{name: [] for name in ENGINES}}
            for seed, batch in enumerate(batches):
                outputs, seconds = _timed(engines, measurement_feeds(bundle, stage, batch, seed))
                reference, candidate = outputs["onnxruntime"], outputs["openvino_bf16"]
                errors += [relative_error(candidate[name], reference[name]) for name in stage.signature.output_names]
                for name in ENGINES:
                    rows[name].append(seconds[name])
        finally:
            for engine in engines.values():
                engine.close()
        gate[stage.name], timings[stage.name] = max(errors), rows
    return {**entry_key(bundle, threads), "gate": gate, "timings": timings}


def entry_key(bundle, threads: int) -> dict:
    """What a cache entry must match to be used: the bundle, this machine, the threads, the engines' versions."""
    import onnxruntime

    return {
        "format": ENTRY_FORMAT,
        "bundle_sha": bundle.short_sha,
        "machine": machine_key(),
        "threads": threads,
        "versions": {"onnxruntime": onnxruntime.__version__, "openvino": openvino_version()},
    }


def read_entry(path, key: dict, unets: list[str]) -> dict | None:
    """The cache entry at `path` when it is whole and matches `key` and the bundle's Unets, else None
    (missing, unreadable, not JSON, another version, a value of the wrong kind)."""
    try:
        entry = json.loads(path.read_text())
        if not isinstance(entry, dict) or any(entry.get(name) != value for name, value in key.items()):
            return None
        gate, timings = entry["gate"], entry["timings"]
        for unet in unets:
            if not (isinstance(gate[unet], (int, float)) and gate[unet] >= 0):
                return None
            row = timings[unet]
            if len({len(row[name]) for name in ("batch", *ENGINES)}) != 1 or not row["batch"]:
                return None
            if not all(isinstance(v, (int, float)) and v > 0 for name in ENGINES for v in row[name]):
                return None
        return entry
    except (OSError, ValueError, KeyError, TypeError):
        return None


def measured(bundle, threads: int, measure=measure) -> tuple[dict, str]:
    """(gate and timings, "cached" or "measured now"): the cache entry when it holds, else `measure`d
    and written (atomically; where the cache folder cannot be written, only measured)."""
    key = entry_key(bundle, threads)
    unets = [stage.name for stage in bundle.unets]
    folder = cache_folder("choice", key["machine"])
    path = None if folder is None else folder / f"{bundle.short_sha}-t{threads}.json"
    entry = None if path is None else read_entry(path, key, unets)
    if entry is not None:
        return entry, "cached"
    entry = measure(bundle, threads)
    if path is not None:
        try:
            atomic_write(path, json.dumps(entry, indent=1))
        except OSError:
            pass  # measured again next time
    return entry, "measured now"


def auto_plan(bundle) -> dict[str, float]:
    """The Unets `--precision auto` may run in bf16, each with the share of its timesteps (the
    noisiest) kept in FP32: the base Unet FP32_SHARE, the super-resolution Unets none. A base Unet
    sampled from a table of continuous times (imagen-pytorch's) is left out: FP32 throughout."""
    plan = {}
    for index, stage in enumerate(bundle.unets):
        if index > 0:
            plan[stage.name] = 0.0
        elif stage.how_sampled.time == "discrete":
            plan[stage.name] = FP32_SHARE
    return plan


def switch_time(bundle, name: str) -> float:
    """The `time` at and above which a Unet split by `auto_plan` runs FP32: the top FP32_SHARE of its
    timesteps (187.5 of 250 on the demo: its first 5 of 20 default steps)."""
    return (1.0 - FP32_SHARE) * bundle.schedules[name].num_timesteps


def default_calls(bundle, plan: dict[str, float]) -> dict[str, tuple[int, int]]:
    """(FP32 calls, bf16 calls) per Unet and image at the bundle's default settings under `plan` (a
    super-resolution Unet runs its sr_strength share of the steps): the weights of the timings."""
    walked = bundle.walked_timesteps(bundle.default_settings)
    calls = {}
    for stage, timesteps in zip(bundle.unets, walked, strict=True):
        if stage.name not in plan:
            calls[stage.name] = (len(timesteps), 0)
            continue
        switch = switch_time(bundle, stage.name) if plan[stage.name] > 0 else math.inf
        fp32 = sum(t >= switch for t in timesteps)
        calls[stage.name] = (fp32, len(timesteps) - fp32)
    return calls


def decide(entry: dict, calls: dict[str, tuple[int, int]]) -> tuple[bool, str]:
    """(bf16 as planned or not, why in a few words) from a measured entry and each Unet's (FP32 calls,
    bf16 calls): the Unets that would run bf16 within the gate, and the Unets' time as a whole lower
    at every measured batch than with every call on ONNX Runtime FP32."""
    candidates = [name for name, (_, bf16) in calls.items() if bf16]
    if not candidates:
        return False, "no Unet auto may run in bf16 (a base Unet sampled from a table stays fp32)"
    gate = {name: entry["gate"][name] for name in candidates}
    worst = max(gate, key=gate.get)
    if not gate[worst] <= GATE:
        return False, f"bf16 failed the quality gate: {worst} relative error {gate[worst]:.1e} > {GATE:.0e}"
    first = entry["timings"][worst]["batch"]
    speedups = []
    for index in range(len(first)):
        ort = sum(sum(calls[name]) * row["onnxruntime"][index] for name, row in entry["timings"].items())
        mixed = sum(
            calls[name][0] * row["onnxruntime"][index] + calls[name][1] * row["openvino_bf16"][index]
            for name, row in entry["timings"].items()
        )
        speedups.append(ort / mixed)
    said = ", ".join(f"{s:.2f}x at batch {b}" for s, b in zip(speedups, first, strict=True))
    if min(speedups) < 1.0:
        return False, f"bf16 as planned was not faster than onnxruntime fp32 ({said})"
    return True, f"gate {gate[worst]:.1e} <= {GATE:.0e}; {said} against onnxruntime fp32"


def gate_report(entry: dict, candidates: list[str]) -> dict:
    return {
        "threshold": GATE,
        "rel_error": dict(entry["gate"]),
        "bf16_unets": list(candidates),
        "passed": bool(candidates) and all(entry["gate"][name] <= GATE for name in candidates),
    }


def choose_cpu(bundle, backend: str, precision: str, threads: int | None, providers=None, measure=measure) -> Choice:
    """The Choice for `backend` "onnxruntime", "openvino" or "auto" (once TensorRT is ruled out), by the
    table of the module docstring. `measure` is the gate and timing measurement (tests pass a fake)."""
    threads = int(threads) if threads else default_threads()
    exported = bundle.unets[0].precision if bundle.unets else "fp32"  # what ONNX Runtime runs
    onnxruntime = functools.partial(_choice, "onnxruntime", exported)
    if backend == "openvino" and providers is not None:
        raise ParameterError(
            "providers", "cpu with --backend openvino (execution providers are ONNX Runtime's)", providers
        )
    if precision == "bf16" and providers is not None:
        raise ParameterError("precision", "fp32 or auto with --providers (bf16 runs on OpenVINO's CPU device)", "bf16")
    if backend == "onnxruntime":
        return onnxruntime("asked for")
    if backend == "auto" and precision == "fp32":
        return onnxruntime("--precision fp32: the exact path")
    if backend == "auto" and providers is not None:
        return onnxruntime("ONNX Runtime's execution providers were named")
    if not openvino_installed():
        if backend == "auto" and precision == "auto":
            return onnxruntime("OpenVINO is not installed: pip install 'imagen-cascade[openvino]' for bf16")
        import_openvino()  # raises BackendError with the install command
    native = has_native_bf16()
    if precision == "bf16" and not native:
        raise BackendError(
            "this CPU has no native bf16 (avx512_bf16 or amx_bf16): OpenVINO would emulate it, slower than "
            "fp32; use --precision fp32 or auto"
        )
    if not native or precision == "fp32":
        why = "asked for" if precision == "fp32" else "this CPU has no native bf16 (avx512_bf16 or amx_bf16)"
        return onnxruntime(why) if backend == "auto" else _choice("openvino", "fp32", why)
    plan = auto_plan(bundle)
    calls = default_calls(bundle, plan)
    candidates = [name for name, (_, bf16) in calls.items() if bf16]
    if precision == "auto" and not candidates:
        why = "no Unet auto may run in bf16: a base Unet sampled from a table stays fp32"
        return onnxruntime(why) if backend == "auto" else _choice("openvino", "fp32", why)
    try:
        entry, when = measured(bundle, threads, measure)
    except BackendError as error:
        if backend != "auto" or precision != "auto":
            raise
        return onnxruntime(f"OpenVINO could not run this bundle: {one_line(error)}")
    if precision == "bf16":
        gate = gate_report(entry, [stage.name for stage in bundle.unets])
        worst = f"quality gate {_worst(gate)} (at most {GATE:.0e})"
        return _choice("openvino", "bf16", f"--precision bf16; {worst}, {when}", gate)
    faster, why = decide(entry, calls)
    gate = gate_report(entry, candidates)
    said = f"quality gate {_worst(gate)} (at most {GATE:.0e}), {when}"
    if backend == "openvino":
        if not gate["passed"]:
            return _choice("openvino", "fp32", f"--precision auto; {said}", gate)
        return _planned(bundle, ("openvino", "fp32"), plan, f"--precision auto; {said}", gate)
    if faster:
        return _planned(bundle, ("onnxruntime", exported), plan, f"{why}, {when}", gate)
    return _choice("onnxruntime", exported, f"{why}, {when}", gate)


def _worst(gate: dict) -> str:
    """The candidate Unet furthest from FP32 and its error (auto has candidates when it measures)."""
    errors = {name: gate["rel_error"][name] for name in gate["bf16_unets"]}
    worst = max(errors, key=errors.get)
    return f"{worst} {errors[worst]:.1e}"


def _choice(backend: str, precision: str, why: str, gate: dict | None = None) -> Choice:
    return Choice(backend, precision, f"{backend} {precision} ({why})", gate)


def _planned(bundle, exact: tuple[str, str], plan: dict[str, float], why: str, gate: dict) -> Choice:
    """Each Unet by `plan`: bf16 on OpenVINO, split by timestep (`exact` (engine, precision) for its
    noisiest timesteps, bf16 on OpenVINO for the rest), or on `exact` where the plan leaves it out."""
    unets = []
    for stage in bundle.unets:
        share = plan.get(stage.name)
        if share is None:
            unets.append(exact)
        elif share == 0:
            unets.append(("openvino", "bf16"))
        else:
            engine = exact[0] if exact[0] == "openvino" else f"{exact[0]}>openvino"
            unets.append((engine, f"{exact[1]}>bf16"))
    backend, precision = (values[0] if len(set(values)) == 1 else "/".join(values) for values in zip(*unets))
    unets = () if len(set(unets)) == 1 else tuple(unets)
    return Choice(backend, precision, f"{backend} {precision} ({why})", gate, unets)
