"""`--backend auto` and `--precision` on the CPU (runtime/backends/choice.py): the measured-choice
cache and a damaged or stale entry, `auto`'s plan and `decide`'s weights, `auto`'s rules with fake
CPU flags and fake timings (the base Unet split by timestep, the super-resolution Unets in bf16), bf16
refused where it cannot run, no OpenVINO, and TensorRT first on a GPU. No OpenVINO model is compiled
here: the measurement is faked. Every test keeps its caches in a temporary IMAGEN_CACHE_DIR."""

import json
from types import SimpleNamespace

import pytest

from imagen.runtime import Pipeline, load_bundle
from imagen.runtime.backends import choice, machine, open_engines
from imagen.runtime.errors import BackendError, ParameterError
from imagen.runtime.pipeline import DEMO_BUNDLE

from bundles import make_bundle, with_engines


@pytest.fixture(scope="module", autouse=True)
def cache_root(module_cache_root):
    return module_cache_root


@pytest.fixture(scope="module")
def demo():
    return load_bundle(DEMO_BUNDLE)


# --- the measured choice and its cache ----------------------------------------------------------


def _fake_measure(calls: list, gate=(5e-3, 8e-3), onnxruntime=(10.0, 100.0), bf16=(6.0, 50.0)):
    """A `measure` that records its calls and returns these errors and seconds (batch 2, batch 16) per Unet."""

    def measure(bundle, threads):
        calls.append(threads)
        names = [stage.name for stage in bundle.unets]
        row = {"batch": [2, 16], "onnxruntime": list(onnxruntime), "openvino_bf16": list(bf16)}
        entry = choice.entry_key(bundle, threads)
        return {**entry, "gate": dict(zip(names, gate)), "timings": {name: dict(row) for name in names}}

    return measure


@pytest.fixture
def fake_cache(monkeypatch, tmp_path):
    """A cache folder of this test's own (fake measurements must not reach the other tests), and a
    fixed OpenVINO version (none need be installed)."""
    monkeypatch.setenv(machine.CACHE_VARIABLE, str(tmp_path / "cache"))
    monkeypatch.setattr(choice, "openvino_version", lambda: "2026.4.1")
    return tmp_path / "cache"


def _entry_path(cache_root, bundle, threads):
    return cache_root / "choice" / machine.machine_key() / f"{bundle.short_sha}-t{threads}.json"


def test_measurements_are_cached_and_a_damaged_or_stale_entry_is_measured_again(demo, fake_cache):
    calls = []
    measure = _fake_measure(calls)
    path = _entry_path(fake_cache, demo, 3)
    assert choice.measured(demo, 3, measure)[1] == "measured now" and json.loads(path.read_text())["threads"] == 3
    assert choice.measured(demo, 3, measure)[1] == "cached" and calls == [3]
    for damage in (b"{not json", b"", json.dumps({"format": 1}).encode(), path.read_bytes()[:40]):
        path.write_bytes(damage)
        entry, when = choice.measured(demo, 3, measure)
        assert when == "measured now" and entry["gate"] == {"unet_0": 5e-3, "unet_1": 8e-3}
        assert choice.read_entry(path, choice.entry_key(demo, 3), ["unet_0", "unet_1"]) == entry  # rewritten whole
    stale = json.loads(path.read_text())
    stale["versions"]["openvino"] = "2020.1"
    path.write_text(json.dumps(stale))
    assert choice.measured(demo, 3, measure)[1] == "measured now" and len(calls) == 6
    assert not list(path.parent.glob(".*.tmp"))  # written under a temporary name, then renamed


def test_an_unwritable_cache_folder_means_measuring_each_time(demo, tmp_path, monkeypatch, fake_cache):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    monkeypatch.setenv(machine.CACHE_VARIABLE, str(blocked))
    calls = []
    for _ in range(2):
        assert choice.measured(demo, 2, _fake_measure(calls))[1] == "measured now"
    assert len(calls) == 2


def test_the_plan_splits_the_base_unet_at_three_quarters_of_its_timesteps(demo):
    """The demo's base Unet walks 249, 236, 223, 210, 197, 183, ... at its default 20 steps: the first
    5 are at or above 187.5 and run FP32; the super-resolution Unet's 5 steps (52 down to 0) run bf16."""
    assert choice.auto_plan(demo) == {"unet_0": 0.25, "unet_1": 0.0}
    assert choice.switch_time(demo, "unet_0") == 187.5
    assert choice.default_calls(demo, choice.auto_plan(demo)) == {"unet_0": (5, 15), "unet_1": (0, 5)}
    assert choice.default_calls(demo, {}) == {"unet_0": (20, 0), "unet_1": (5, 0)}


def test_decide_weights_each_unet_by_its_calls_and_asks_for_both_batches():
    """Only the Unets with bf16 calls count for the gate; the speed-up is the Unets' time as a whole,
    each call on its planned engine, against every call on ONNX Runtime FP32."""
    entry = {
        "gate": {"unet_0": 5e-2, "unet_1": 2e-2},
        "timings": {
            "unet_0": {"batch": [2, 16], "onnxruntime": [10.0, 80.0], "openvino_bf16": [5.0, 40.0]},
            "unet_1": {"batch": [2, 16], "onnxruntime": [40.0, 400.0], "openvino_bf16": [40.0, 200.0]},
        },
    }
    calls = {"unet_0": (20, 0), "unet_1": (0, 5)}  # 2: 400 vs 400; 16: 3600 vs 2600
    faster, why = choice.decide(entry, calls)
    assert faster and "1.00x at batch 2" in why and "1.38x at batch 16" in why
    entry["timings"]["unet_1"]["openvino_bf16"][0] = 41.0
    assert not choice.decide(entry, calls)[0]  # slower at batch 2
    entry["gate"]["unet_0"] = 2e-2
    split = {"unet_0": (5, 15), "unet_1": (0, 5)}  # 2: 400 vs 50 + 75 + 205; 16: 3600 vs 400 + 600 + 1000
    faster, why = choice.decide(entry, split)
    assert faster and "1.21x at batch 2" in why and "1.80x at batch 16" in why
    entry["gate"]["unet_1"] = 3.1e-2
    faster, why = choice.decide(entry, calls)
    assert not faster and "unet_1 relative error 3.1e-02 > 3e-02" in why
    faster, why = choice.decide(entry, {"unet_0": (20, 0)})
    assert not faster and "no Unet auto may run in bf16" in why


MIXED = ("onnxruntime>openvino/openvino", "fp32>bf16/bf16")
SPLIT = [[("onnxruntime", "fp32"), ("openvino", "bf16")], [("openvino", "bf16")]]


@pytest.mark.parametrize(
    "flags,backend,precision,timings,gate,expected,fragment",
    [
        ({"avx2", "fma"}, "auto", "auto", None, None, ("onnxruntime", "fp32"), "no native bf16"),
        ({"avx2", "avx512f"}, "openvino", "auto", None, None, ("openvino", "fp32"), "no native bf16"),
        ({"avx512_bf16"}, "auto", "fp32", None, None, ("onnxruntime", "fp32"), "the exact path"),
        ({"avx512_bf16"}, "onnxruntime", "auto", None, None, ("onnxruntime", "fp32"), "asked for"),
        ({"avx512_bf16"}, "auto", "auto", (10.0, 6.0), (5e-3, 8e-3), MIXED, "1.47x at batch 2"),
        ({"avx512_bf16"}, "auto", "auto", (10.0, 6.0), (4e-2, 8e-3), ("onnxruntime", "fp32"), "unet_0 relative"),
        ({"amx_bf16"}, "auto", "auto", (10.0, 12.0), (5e-3, 8e-3), ("onnxruntime", "fp32"), "was not faster"),
        ({"avx512_bf16"}, "auto", "auto", (10.0, 6.0), (5e-3, 4e-2), ("onnxruntime", "fp32"), "quality gate"),
        ({"avx512_bf16"}, "openvino", "auto", (10.0, 12.0), (5e-3, 8e-3), ("openvino", "fp32>bf16/bf16"), "8.0e-03"),
        ({"avx512_bf16"}, "openvino", "auto", (10.0, 6.0), (5e-3, 4e-2), ("openvino", "fp32"), "unet_1 4.0e-02"),
        ({"avx512_bf16"}, "openvino", "auto", (10.0, 6.0), (4e-2, 8e-3), ("openvino", "fp32"), "unet_0 4.0e-02"),
        ({"avx512_bf16"}, "auto", "bf16", (10.0, 12.0), (5e-3, 4e-2), ("openvino", "bf16"), "unet_1 4.0e-02"),
    ],
)
def test_auto_rules_with_fake_cpu_flags_and_timings(
    demo, monkeypatch, fake_cache, flags, backend, precision, timings, gate, expected, fragment
):
    """What each CPU and measurement leads to; no OpenVINO model is compiled (the measurement is
    faked, and a CPU without native bf16 must never be measured). Under auto the demo's base Unet
    runs FP32 for 5 of its 20 calls and bf16 for 15, its super-resolution Unet bf16 for all 5."""
    monkeypatch.setattr(choice, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(choice, "openvino_installed", lambda: True)
    if timings is None:
        measure = lambda *args: pytest.fail("measured")  # noqa: E731
    else:
        slow, fast = timings
        measure = _fake_measure([], gate, onnxruntime=(slow, 10 * slow), bf16=(fast, 10 * fast))
    made = choice.choose_cpu(demo, backend, precision, 2, measure=measure)
    print(made.reason)
    assert (made.backend, made.precision) == expected and fragment in made.reason
    assert made.reason.startswith(f"{made.backend} {made.precision} (") and "\n" not in made.reason
    assert (made.gate is None) == (timings is None)
    phases = [made.phases(index) for index in range(2)]
    if ">" in made.precision:
        engine = expected[0].split(">")[0]
        assert phases == [[(engine, "fp32"), ("openvino", "bf16")], [("openvino", "bf16")]]
        assert made.engines == {engine, "openvino"}
    else:
        assert phases == [[expected]] * 2 and made.engines == {expected[0]}


def test_a_one_unet_cascade_splits_its_base_unet_and_a_table_sampled_one_stays_fp32(demo, monkeypatch, fake_cache):
    """A cascade of one discrete-time Unet runs it split (one engine pair, no per-Unet list); a base
    Unet sampled from a table of continuous times (imagen-pytorch's) is not planned: FP32, unmeasured."""
    monkeypatch.setattr(choice, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    monkeypatch.setattr(choice, "openvino_installed", lambda: True)
    base = SimpleNamespace(
        unets=demo.unets[:1],
        schedules=demo.schedules,
        default_settings=demo.default_settings,
        walked_timesteps=lambda settings: demo.walked_timesteps(settings)[:1],
        short_sha=demo.short_sha,
        root=demo.root,
    )
    measure = _fake_measure([], (5e-3,), onnxruntime=(10.0, 100.0), bf16=(6.0, 60.0))
    made = choice.choose_cpu(base, "auto", "auto", 2, measure=measure)
    assert (made.backend, made.precision, made.unets) == ("onnxruntime>openvino", "fp32>bf16", ())
    assert made.phases(0) == [("onnxruntime", "fp32"), ("openvino", "bf16")] and "1.43x at batch 2" in made.reason
    table = SimpleNamespace(name="unet_0", precision="fp32", how_sampled=SimpleNamespace(time="continuous"))
    sampled = SimpleNamespace(unets=[table], walked_timesteps=lambda settings: [list(range(8))], default_settings=None)
    for backend, expected in (("auto", "onnxruntime"), ("openvino", "openvino")):
        made = choice.choose_cpu(sampled, backend, "auto", 2, measure=lambda *args: pytest.fail("measured"))
        assert (made.backend, made.precision, made.gate) == (expected, "fp32", None)
        assert "a base Unet sampled from a table stays fp32" in made.reason


def test_bf16_is_refused_where_it_cannot_run_with_the_fix(demo, monkeypatch):
    monkeypatch.setattr(choice, "cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
    monkeypatch.setattr(choice, "openvino_installed", lambda: True)
    for backend in ("auto", "openvino"):
        with pytest.raises(BackendError, match=r"no native bf16.*use --precision fp32 or auto"):
            choice.choose_cpu(demo, backend, "bf16", 2)
    for backend in ("onnxruntime", "tensorrt"):
        with pytest.raises(ParameterError, match=f"precision must be fp32 or auto with --backend {backend}"):
            Pipeline.load(backend=backend, precision="bf16")
    with pytest.raises(ParameterError, match="precision must be one of auto, fp32, bf16, got 'fp16'"):
        Pipeline.load(precision="fp16")
    with pytest.raises(ParameterError, match="with --providers"):
        choice.choose_cpu(demo, "auto", "bf16", 2, providers=["CPUExecutionProvider"])
    with pytest.raises(ParameterError, match="providers must be cpu with --backend openvino"):
        choice.choose_cpu(demo, "openvino", "fp32", 2, providers="auto")


def test_without_openvino_auto_is_onnxruntime_and_asking_for_it_names_the_install(demo, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` raises ImportError
    made = choice.choose_cpu(demo, "auto", "auto", 2)
    assert (made.backend, made.precision) == ("onnxruntime", "fp32") and "not installed" in made.reason
    for backend, precision in (("openvino", "fp32"), ("auto", "bf16")):
        with pytest.raises(BackendError, match=r"OpenVINO is not installed.*pip install 'imagen-cascade\[openvino\]'"):
            choice.choose_cpu(demo, backend, precision, 2)


def test_tensorrt_stays_first_on_a_gpu_whatever_the_cpu(tmp_path, monkeypatch):
    from imagen.runtime import backends
    from imagen.runtime.backends import cuda, tensorrt

    root = with_engines(make_bundle(tmp_path / "bundle"))
    monkeypatch.setattr(cuda, "tensorrt_environment", lambda: (None, None, "9.0", "10.3.0"))
    monkeypatch.setattr(tensorrt, "TensorRTBackend", lambda *args, **kwargs: object())
    monkeypatch.setattr(backends, "choose_cpu", lambda *args, **kwargs: pytest.fail("the CPU choice was asked"))
    backends, made = open_engines(load_bundle(root), "auto", precision="auto")
    assert (made.backend, made.precision) == ("tensorrt", "fp32") and set(backends) == {
        "text_encoder",
        "unet_0",
        "unet_1",
    }
    assert made.reason == "tensorrt fp32 (the bundle's engines match this GPU)"


def test_a_split_backend_routes_each_call_by_its_time_and_closes_both():
    """At or above the switch the noisy engine runs (also when a call's rows straddle it), below the
    other; a call without `time` is a SignatureError; close closes both and raises the first error;
    a warm-up takes the fewest steps that run both (1 where no walk crosses the switch)."""
    import numpy as np

    from imagen.runtime.backends import SplitBackend
    from imagen.runtime.errors import SignatureError

    class Engine:
        def __init__(self, name, fails=False):
            self.name, self.fails, self.closed, self.stage = name, fails, False, SimpleNamespace(name="unet_0")

        def run(self, feeds):
            return {"engine": self.name}

        def close(self):
            self.closed = True
            if self.fails:
                raise BackendError(f"{self.name} failed to close")

    noisy, rest = Engine("noisy", fails=True), Engine("rest", fails=True)
    split = SplitBackend(noisy, rest, 187.5)
    for times, expected in (([249.0], "noisy"), ([187.5], "noisy"), ([187.0], "rest"), ([0.0, 200.0], "noisy")):
        assert split.run({"time": np.asarray(times, np.float32)}) == {"engine": expected}
    with pytest.raises(SignatureError, match="unet_0: inputs must include time"):
        split.run({"x": np.zeros(1, np.float32)})
    with pytest.raises(BackendError, match="noisy failed to close"):
        split.close()
    assert noisy.closed and rest.closed
    # a warm-up's fewest steps that reach both engines: linspace 249, 0; leading (IF's) 751, 501, 251, 1
    assert split.fewest_steps(250, SimpleNamespace(spacing="linspace", steps_offset=0)) == 2
    assert SplitBackend(noisy, rest, 750.0).fewest_steps(1000, SimpleNamespace(spacing="leading", steps_offset=1)) == 4
    assert SplitBackend(noisy, rest, 300.0).fewest_steps(250, SimpleNamespace(spacing="linspace", steps_offset=0)) == 1
