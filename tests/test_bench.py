"""Smoke test of the benchmark suite (the `bench` package): quick mode on the tiny bundle, every
section present with finite numbers and a Markdown report between the markers. No timing
assertions: this machine's speed is not what the test is about."""

import math

import pytest

from bench.__main__ import main
from bench.report import END, START, write_report


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
    assert [r["sampler"] for r in four["rows"]] == ["ddpm", "ddim", "ddim", "dpmpp_2m", "dpmpp_2m", "dpmpp_2m"]
    for row in four["rows"]:
        assert 0 <= row["exact"] <= 1
        _positive(row, "images_per_second", "steps")
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
