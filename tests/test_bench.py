"""The bench itself (bench/): the CPU suite's smoke run in quick mode on the tiny bundle, every
section present with finite numbers and a Markdown report between the markers; the suites'
section numbers and commands; how the bench finds the run a bundle came from; the serving load
generator's guards. No timing assertions: this machine's speed is not what the test is about.
The GPU suite has its own file (test_bench_gpu.py)."""

import base64
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench.__main__ import main
from bench.cpu.report import END, START, write_report
from bench.cpu.steps_vs_quality import newcombe, wilson
from bench.cpu.suite import SECTIONS as CPU_SECTIONS
from bench.cpu.workload import default_run_dir, same_run
from bench.gpu.suite import SECTIONS as GPU_SECTIONS
from imagen.runtime import load_bundle
from imagen.runtime.contract import Source

REPO = Path(__file__).resolve().parents[1]


def _numbers(value, path=""):
    """(path, number) for every int/float in a nested result (bools excluded)."""
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _numbers(item, f"{path}.{key}")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _numbers(item, f"{path}[{index}]")


def _positive(section: dict, *keys):
    for key in keys:
        value = section
        for part in key.split("."):
            value = value[part]
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (key, value)


@pytest.fixture(scope="module")
def bench_result(tiny_run, bundle_fp32, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "b.md"
    out.write_text("# Benchmarks\n\nkept text\n")
    results = main(
        ["--quick", "--threads", "1", "--run", str(tiny_run), "--bundle", str(bundle_fp32), "--out", str(out)]
    )
    return results, out


def test_every_section_has_finite_numbers(bench_result):
    results, _ = bench_result
    sections = results["sections"]
    assert sorted(sections) == ["1", "2", "3", "4", "5"]
    for key, section in sections.items():
        assert "skipped" not in section, key
        for path, number in _numbers(section):
            assert math.isfinite(number), f"section {key}{path} = {number}"
    _positive(sections["1"], "reference_s_per_image", "runtime_s_per_image", "speedup")
    two = sections["2"]
    _positive(two, "gemm.numpy.gflops", "gemm.onnxruntime.gflops", "floor_gflops")
    assert len(two["unets"]) == 3  # the bundle's two Unets and the random-weight base Unet the bench builds
    for row in two["unets"]:
        _positive(row, "flops_per_call_batch1", "median_s", "achieved_gflops", "percent_of_gemm")
    assert len(two["session_variants"]) >= 5
    for row in two["session_variants"]:
        _positive(row, "median_s", "percent_of_gemm")
    three = sections["3"]
    _positive(three, "total_s", "engine_s", "outside_s", "outside_percent")
    assert three["engine_s"] < three["total_s"]
    assert three["engine_calls"] > 0
    four = sections["4"]
    samplers = ["ddpm", "euler_a", "dpmpp_2m_sde", "dpmpp_2m", "ddim"]
    assert [r["sampler"] for r in four["rows"]] == ["ddpm", *samplers, *samplers]
    for row in four["rows"]:
        low, high = row["interval"]
        assert 0 <= low <= row["exact"] <= high <= 1
        _positive(row, "images_per_second", "steps", "unet_calls")
        assert row["hits"] == round(row["exact"] * row["n"])
        assert len(row["exact_per_seed"]) == len(four["config"]["seeds"])
    # rows of one step count make the same Unet calls
    assert len({r["unet_calls"] for r in four["rows"] if r["steps"] == four["rows"][1]["steps"]}) == 1
    low, high = four["target"]["interval"]
    assert low <= four["target"]["value"] <= high
    five = sections["5"]
    _positive(five, "cold_start_s.median", "import_s", "load_s", "peak_rss_mb_one_image", "peak_rss_mb_max_batch")
    assert five["torch_imported"] is False


def test_markdown_report_between_markers(bench_result):
    _, out = bench_result
    text = out.read_text()
    assert text.startswith("# Benchmarks\n\nkept text\n")
    assert text.count(START) == 1 and text.count(END) == 1
    report = text[text.index(START) : text.index(END)]
    for heading in ("### Targets", "### 1.", "### 2.", "### 3.", "### 4.", "### 5."):
        assert heading in report
    assert "Machine:" in report
    assert "| nan" not in report and "| inf" not in report


def test_intervals_match_statsmodels():
    """Wilson's interval and Newcombe's difference interval (method 10), against statsmodels'
    proportion_confint(method="wilson") and confint_proportions_2indep(method="newcomb"); the first
    difference is Newcombe's own worked example (56/70 - 48/80: 0.0524 to 0.3339)."""
    assert wilson(189, 192) == pytest.approx((0.955075, 0.994672), abs=1e-6)
    assert wilson(56, 70) == pytest.approx((0.691833, 0.876953), abs=1e-6)
    assert newcombe(56, 70, 48, 80) == pytest.approx((0.052431, 0.333873), abs=1e-6)
    assert newcombe(191, 192, 189, 192) == pytest.approx((-0.015423, 0.040028), abs=1e-6)


def test_sampler_study_swaps_reach_the_runtime_and_are_put_back():
    """Each factor the study swaps in is what the runtime then calls (with its own arguments), and
    the runtime's functions are back afterwards."""
    from bench.cpu.sampler_study import swapped
    from imagen.runtime import bundle, guidance, pipeline, samplers

    x0 = np.linspace(-3, 3, 2 * 3 * 4 * 4, dtype=np.float32).reshape(2, 3, 4, 4)
    before = (guidance.dynamic_threshold, bundle.spaced_timesteps, pipeline.run_sampler)
    with swapped({"threshold": "static"}, base_size=32):
        np.testing.assert_array_equal(guidance.threshold(x0, "dynamic", 0.9, None), np.clip(x0, -1, 1))
    with swapped({"threshold": "none"}, base_size=32):
        np.testing.assert_array_equal(guidance.threshold(x0, "dynamic", 0.9, None), x0)
    with swapped({"spacing": "trailing"}, base_size=32):
        walked = bundle.spaced_timesteps(250, 25, 0.25, "linspace", 0)
        assert walked == samplers.spaced_timesteps(250, 25, 0.25, "trailing") and walked[0] == 59
    seen = []
    with swapped({"sr_sampler": "ddpm"}, base_size=32):
        fake = {"dpmpp_2m": lambda *a: seen.append("dpmpp_2m"), "ddpm": lambda *a: seen.append("ddpm")}
        original = samplers.SAMPLERS.copy()
        samplers.SAMPLERS.update(fake)
        try:
            pipeline.run_sampler("dpmpp_2m", None, np.zeros((1, 3, 32, 32)), None, [0], None)
            pipeline.run_sampler("dpmpp_2m", None, np.zeros((1, 3, 64, 64)), None, [0], None)
        finally:
            samplers.SAMPLERS.clear()
            samplers.SAMPLERS.update(original)
    assert seen == ["dpmpp_2m", "ddpm"]
    assert (guidance.dynamic_threshold, bundle.spaced_timesteps, pipeline.run_sampler) == before


def test_write_report_replaces_only_the_marked_block(tmp_path):
    path = tmp_path / "b.md"
    write_report(path, "first")
    path.write_text(path.read_text() + "\nafter\n")
    write_report(path, "second")
    text = path.read_text()
    assert "second" in text and "first" not in text and text.rstrip().endswith("after")
    assert text.count(START) == 1


def test_section_one_is_skipped_without_a_run(bundle_fp32, tmp_path):
    results = main(
        [
            "--quick",
            "--threads",
            "1",
            "--sections",
            "1",
            "--run",
            str(tmp_path / "missing"),
            "--bundle",
            str(bundle_fp32),
        ]
    )
    assert "skipped" in results["sections"]["1"]


def test_benchmark_tells_the_same_run_by_its_config_hash(bundle_fp32, tiny_run, tmp_path):
    source = load_bundle(bundle_fp32).manifest.source
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_bytes((tiny_run / "config.json").read_bytes() + b" ")
    assert same_run(source, tiny_run) is True and same_run(source, other) is False
    assert same_run(Source(checkpoint=str(tiny_run)), tiny_run) is True  # bundles written before the hash
    assert same_run(Source(weights="latest"), tiny_run) is None
    copy = tmp_path / "bundle"
    copy.mkdir()
    manifest = json.loads((bundle_fp32 / "manifest.json").read_text())
    manifest["source"]["checkpoint"] = str(tiny_run.resolve())
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert default_run_dir(copy) == tiny_run.resolve()


def test_the_suites_section_numbers_do_not_clash():
    gpu = [6, *map(int, GPU_SECTIONS)]  # 6: the environment, always measured
    assert list(CPU_SECTIONS) == [1, 2, 3, 4, 5] and gpu == [6, 7, 8, 9]
    assert not set(CPU_SECTIONS) & set(gpu)


@pytest.mark.parametrize(
    "module",
    [
        "bench",
        "bench.cpu",
        "bench.gpu",
        "bench.cpu.presets",
        "bench.cpu.sampler_study",
        "bench.cpu.train_ddp",
        "bench.cpu.batch",
        "bench.cpu.deepfloyd",
        "bench.cpu.imagen_pytorch",
        "bench.cpu.precision",
        "bench.cpu.precision_quality",
        "bench.serve_load",
    ],
)
def test_the_documented_commands_start(module):
    """Each `python -m ...` that the docs name answers --help (no section runs)."""
    done = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: python -m {'bench' if module == 'bench.cpu' else module}")


def test_tests_import_bench_only_to_test_it():
    """Only the bench's own tests import it: test data lives in the tests or in the package."""
    importing = sorted(
        path.name
        for path in (REPO / "tests").glob("*.py")
        if any(line.lstrip().startswith(("import bench", "from bench")) for line in path.read_text().splitlines())
    )
    assert importing == ["test_bench.py", "test_bench_gpu.py"]


def test_precision_quality_pairs_images_and_applies_the_gate():
    """The paired comparison of the bf16 quality bench: rates, differences, discordant pairs,
    McNemar's exact p and the gate (exact within 2 points, colour/shape/position within 3)."""
    from bench.cpu.precision_quality import compare, mcnemar

    def rows(exact: list[int], colour: list[int]) -> list[dict]:
        return [{"exact": e, "colour": c, "shape": True, "position": True} for e, c in zip(exact, colour)]

    reference = rows([1] * 90 + [0] * 10, [1] * 100)
    worse = rows([1] * 86 + [0] * 4 + [1] * 2 + [0] * 8, [1] * 97 + [0] * 3)  # exact: 4 lost, 2 gained
    result = compare(reference, worse)
    assert result["n"] == 100 and result["exact"]["discordant"] == [4, 2]
    assert math.isclose(result["exact"]["rate"], 88.0) and math.isclose(result["exact"]["difference"], -2.0)
    assert result["exact"]["interval"][0] < -2.0 < result["exact"]["interval"][1]
    assert math.isclose(result["exact"]["p"], 0.6875)  # 2 * P(X <= 2), X ~ Binomial(6, 1/2)
    assert result["passed"]  # -2.0 exact and -3.0 colour: on both limits
    assert not compare(reference, rows([1] * 87 + [0] * 13, [1] * 100))["passed"]  # -3 exact
    assert mcnemar(0, 0) == 1.0 and math.isclose(mcnemar(0, 10), 2 / 1024)


def test_load_generator_loads_only_this_machine_and_checks_every_png():
    from PIL import Image

    from bench.serve_load import classify, loopback_url

    assert loopback_url("http://127.0.0.1:8000") == ("127.0.0.1", 8000)
    assert loopback_url("http://localhost:9") == ("localhost", 9)
    assert loopback_url("http://[::1]:80/") == ("::1", 80)
    for url in ("http://10.0.0.1:8000", "http://example.com", "https://127.0.0.1:8000", "http://0.0.0.0:1"):
        with pytest.raises(ValueError):
            loopback_url(url)
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buffer, format="PNG")
    png = base64.b64encode(buffer.getvalue()).decode()
    answer = json.dumps({"data": [{"b64_json": png}]}).encode()
    assert classify(200, answer, 1, 16) == "ok"
    assert classify(200, answer, 2, 16) == "lost" and classify(200, answer, 1, 32) == "lost"
    cut = base64.b64encode(buffer.getvalue()[:40]).decode()  # the signature and header, no pixels
    assert classify(200, json.dumps({"data": [{"b64_json": cut}]}).encode(), 1, 16) == "lost"
    assert classify(None, b"", 1, 16) == "lost"
    assert (classify(429, b"", 1, 16), classify(503, b"", 1, 16), classify(500, b"", 1, 16)) == ("429", "503", "errors")
