"""Which CPU engine and precision a bundle runs with here: the precision rules, bf16's quality gate,
and `--backend auto`'s measured choice between ONNX Runtime FP32 and OpenVINO bf16.

    precision  onnxruntime        openvino                              auto (CPU)
    fp32       the bundle's ONNX  OpenVINO FP32                         ONNX Runtime: today's images, bit for bit
    bf16       ParameterError     every Unet bf16 (native bf16 only)    as openvino
    auto       as fp32            super-resolution Unets bf16 where     the base Unet on ONNX Runtime FP32, the
                                  native and gated, the rest FP32       super-resolution Unets on OpenVINO bf16
                                                                        where native, gated and faster

The text encoder always runs in FP32 (one call per batch; bf16 would buy nothing and lose digits).
"Native" is `machine.native_bf16` (AVX-512 BF16 or AMX): without it OpenVINO converts to bf16 and
back in software, slower than FP32, so `auto` never considers bf16 there and never OpenVINO at all
(OpenVINO FP32 ran at 0.81-0.93x of ONNX Runtime's on an AVX2-only CPU and 0.82-1.01x on the
AVX-512 machine of docs/benchmarks.md), and an explicit bf16 is refused with the fix.

Under `auto` the base Unet stays FP32: it decides what is drawn, and bf16 blurs the difference
between its text and null-text outputs (the direction guidance amplifies: 9e-2 relative on the
demo's base Unet, whose outputs are within 5.4e-3). Measured on the demo at n = 384 per split,
paired with FP32 (docs/cpu-backends.md): every Unet in bf16 lost 2.3 points of exact match on
training captions (McNemar p = 0.02), the base Unet alone 1.8, the super-resolution Unet alone 0.8
(p = 0.38) and 0.3 on held-out captions. A super-resolution Unet redraws an image it is given, so
its rounding changes pixels, not the scene. `bf16_unets` says which Unets `auto` may run in bf16.

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
    "bf16 (OpenVINO, CPUs with AVX-512 BF16 or AMX), or auto: bf16 where the CPU has it, the Unets pass the "
    "quality gate and it was measured faster here, else fp32."
)
GATE = 3e-2
TIMED_CALLS, TIME_BUDGET_S = 3, 2.0  # timed calls per engine and batch, fewer past the budget
ENTRY_FORMAT = 1
ENGINES = ("onnxruntime", "openvino_bf16")  # the two timed, the reference first


@dataclass(frozen=True)
class Choice:
    """What runs here: `backend` (every stage's engine), `precision` (the Unets' inference precision;
    the text encoder's is FP32), `reason` (one line: what and why) and `gate` (bf16's quality gate
    where it was measured: threshold, each Unet's relative error, the Unets it applies to, passed).

    `unets` is set where the Unets differ: (engine, precision) per Unet in cascade order. Then
    `backend` or `precision`, where they differ between Unets, name one per Unet joined by "/"
    ("onnxruntime/openvino", "fp32/bf16"), and the text encoder runs on the base Unet's engine in FP32."""

    backend: str
    precision: str
    reason: str
    gate: dict | None = field(default=None, compare=False)
    unets: tuple[tuple[str, str], ...] = ()

    def engine(self, index: int) -> tuple[str, str]:
        """(engine, precision) of the Unet at cascade position `index` (0: the base Unet)."""
        return self.unets[index] if self.unets else (self.backend, self.precision)

    @property
    def engines(self) -> set[str]:
        return {backend for backend, _ in self.unets} if self.unets else {self.backend}


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


def bf16_unets(bundle) -> list[str]:
    """The Unets `--precision auto` may run in bf16: the super-resolution Unets (module docstring)."""
    return [stage.name for stage in bundle.unets[1:]]


def default_calls(bundle) -> dict[str, float]:
    """Unet calls per image at the bundle's default settings (a super-resolution Unet runs its
    sr_strength share): the weights of the timings."""
    settings = bundle.default_settings
    return {
        stage.name: steps * (1.0 if index == 0 else settings.sr_strength)
        for index, (stage, steps) in enumerate(zip(bundle.unets, settings.steps, strict=True))
    }


def decide(entry: dict, calls: dict[str, float], candidates: list[str]) -> tuple[bool, str]:
    """(bf16 for the `candidates` or not, why in a few words) from a measured entry and each Unet's
    calls: within the gate, and the Unets' time as a whole (the others on ONNX Runtime either way)
    lower at every measured batch."""
    if not candidates:
        return False, "the bundle has no super-resolution Unet, and its base Unet stays fp32 under auto"
    gate = {name: entry["gate"][name] for name in candidates}
    worst = max(gate, key=gate.get)
    if not gate[worst] <= GATE:
        return False, f"bf16 failed the quality gate: {worst} relative error {gate[worst]:.1e} > {GATE:.0e}"
    first = entry["timings"][worst]["batch"]
    speedups = []
    for index in range(len(first)):
        ort = sum(calls[name] * row["onnxruntime"][index] for name, row in entry["timings"].items())
        mixed = sum(
            calls[name] * row["openvino_bf16" if name in candidates else "onnxruntime"][index]
            for name, row in entry["timings"].items()
        )
        speedups.append(ort / mixed)
    said = ", ".join(f"{s:.2f}x at batch {b}" for s, b in zip(speedups, first, strict=True))
    if min(speedups) < 1.0:
        return False, f"bf16 super-resolution Unets were not faster than onnxruntime fp32 ({said})"
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
    candidates = bf16_unets(bundle)
    if precision == "auto" and not candidates:
        why = "no super-resolution Unet: the base Unet stays fp32 under auto"
        return onnxruntime(why) if backend == "auto" else _choice("openvino", "fp32", why)
    try:
        entry, when = measured(bundle, threads, measure)
    except BackendError as error:
        if backend != "auto" or precision != "auto":
            raise
        return onnxruntime(f"OpenVINO could not run this bundle: {one_line(error)}")
    faster, why = decide(entry, default_calls(bundle), candidates)
    gate = gate_report(entry, candidates)
    if precision == "bf16":
        worst = f"quality gate {max(gate['rel_error'].values()):.1e} (at most {GATE:.0e})"
        return _choice("openvino", "bf16", f"--precision bf16; {worst}, {when}", gate)
    said = f"quality gate {_worst(gate)} (at most {GATE:.0e}), {when}"
    if backend == "openvino":
        if not gate["passed"]:
            return _choice("openvino", "fp32", f"--precision auto; {said}", gate)
        return _mixed(bundle, ("openvino", "fp32"), candidates, f"--precision auto; {said}", gate)
    if faster:
        return _mixed(bundle, ("onnxruntime", exported), candidates, f"{why}, {when}", gate)
    return _choice("onnxruntime", exported, f"{why}, {when}", gate)


def _worst(gate: dict) -> str:
    """The candidate Unet furthest from FP32 and its error (auto has candidates when it measures)."""
    errors = {name: gate["rel_error"][name] for name in gate["bf16_unets"]}
    worst = max(errors, key=errors.get)
    return f"{worst} {errors[worst]:.1e}"


def _choice(backend: str, precision: str, why: str, gate: dict | None = None) -> Choice:
    return Choice(backend, precision, f"{backend} {precision} ({why})", gate)


def _mixed(bundle, base: tuple[str, str], candidates: list[str], why: str, gate: dict) -> Choice:
    """The base Unet (and every Unet not in `candidates`) on `base` (engine, precision), the
    candidates bf16 on OpenVINO."""
    unets = tuple(("openvino", "bf16") if stage.name in candidates else base for stage in bundle.unets)
    backend, precision = (values[0] if len(set(values)) == 1 else "/".join(values) for values in zip(*unets))
    if len(set(unets)) == 1:
        unets = ()
    return Choice(backend, precision, f"{backend} {precision} ({why})", gate, unets)
