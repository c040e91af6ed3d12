"""imagen-run on the tiny exported bundle: PNG files with their metadata, --json and --out-dir,
--sr-strength, --force, and its one-line errors (the policy shared by all four commands is in
test_cli_policy.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from imagen.runtime import Pipeline, load_bundle
from imagen.runtime.cli import main as run_cli
from imagen.runtime.png import PNG_TEXT_KEYS

PYTHON = sys.executable


def test_cli_sr_strength(bundle_fp32, tmp_path):
    from PIL import Image

    out = tmp_path / "out.png"
    common = ["a red circle", "--bundle", str(bundle_fp32), "--steps", "4", "--seed", "2", "--threads", "1"]
    common += ["--precision", "fp32"]  # Pipeline.load's default: ONNX Runtime's exact images
    result = CliRunner().invoke(run_cli, [*common, "-o", str(out), "--quiet", "--sr-strength", "0.5"])
    assert result.exit_code == 0, result.output
    image = Image.open(out)
    assert float(image.text["sr_strength"]) == 0.5
    pipe = Pipeline.load(bundle_fp32, threads=1)
    np.testing.assert_array_equal(np.asarray(image), pipe("a red circle", steps=4, seed=2, sr_strength=0.5).array[0])
    bad = CliRunner().invoke(run_cli, [*common, "-o", str(tmp_path / "bad.png"), "--sr-strength", "0"])
    assert bad.exit_code == 2 and bad.output.startswith("error: sr_strength must be a number in (0, 1]")
    assert not (tmp_path / "bad.png").exists()


def test_cli_writes_png_with_metadata_and_refuses_overwrite(bundle_fp32, tmp_path):
    from PIL import Image

    out = tmp_path / "out.png"

    def args(seed, *extra):
        return [
            "a red circle",
            "--bundle",
            str(bundle_fp32),
            "-o",
            str(out),
            "--steps",
            "3",
            "--seed",
            str(seed),
            "--threads",
            "1",
            "--precision",
            "fp32",
            "--quiet",
            *extra,
        ]

    result = CliRunner().invoke(run_cli, args(4))
    assert result.exit_code == 0, result.output
    image = Image.open(out)
    assert image.size == (32, 32) and image.mode == "RGB"
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    assert image.text["prompt"] == "a red circle" and image.text["seed"] == "4"
    assert image.text["sampler"] == "ddpm" and json.loads(image.text["steps"]) == [3, 3]
    assert image.text["bundle_sha"] == load_bundle(bundle_fp32).short_sha and float(image.text["guidance_scale"]) == 5.0
    # the keys imagen-serve's PNGs carry (one encode_png); a negative prompt only where one was given
    assert set(image.text) == set(PNG_TEXT_KEYS) - {"negative_prompt"}
    pipe = Pipeline.load(bundle_fp32, threads=1)
    np.testing.assert_array_equal(np.asarray(image), pipe("a red circle", steps=3, seed=4).array[0])
    before = out.read_bytes()
    again = CliRunner().invoke(run_cli, args(5))
    assert again.exit_code == 2 and "--force" in again.output and out.read_bytes() == before
    assert len(again.output.strip().splitlines()) == 1 and again.output.startswith("error: ")
    forced = CliRunner().invoke(run_cli, args(5, "--force"))
    assert forced.exit_code == 0 and out.read_bytes() != before
    assert not list(tmp_path.glob(".*tmp"))


def test_cli_json_and_out_dir(bundle_fp32, tmp_path):
    result = CliRunner().invoke(
        run_cli,
        [
            "a red circle",
            "two squares",
            "--bundle",
            str(bundle_fp32),
            "--out-dir",
            str(tmp_path / "imgs"),
            "--steps",
            "2",
            "--num-images",
            "2",
            "--seed",
            "1",
            "--json",
            "--sampler",
            "ddim",
            "--threads",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert [i["index"] for i in info] == [0, 1, 2, 3] and all(i["sampler"] == "ddim" for i in info)
    names = sorted(p.name for p in (tmp_path / "imgs").iterdir())
    assert names == [
        "000-a-red-circle.png",
        "001-a-red-circle.png",
        "002-two-squares.png",
        "003-two-squares.png",
    ]
    assert [Path(i["file"]).name for i in info] == names


@pytest.mark.parametrize(
    "args,pattern",
    [
        (["--bundle", "/nonexistent/bundle"], "does not exist"),
        (["--steps", "0"], "steps must be"),
        (["--sampler", "euler"], "is not one of"),
        (["--num-images", "2"], "-o/--out names one file"),
    ],
)
def test_cli_errors_are_one_line_exit_2(args, pattern, bundle_fp32, tmp_path):
    base = ["a prompt", "--bundle", str(bundle_fp32), "-o", str(tmp_path / "x.png"), "--quiet"]
    result = CliRunner().invoke(run_cli, base + args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and pattern in lines[0], result.output
    assert "Traceback" not in result.output and not (tmp_path / "x.png").exists()


def test_cli_refuses_a_negative_prompt_where_the_bundle_has_a_learned_null_text(tmp_path):
    """The demo bundle's Unets take a learned null text: --negative-prompt (even "") is a one-line user
    error naming the option, before any image is made. Bundles that take one: test_negative_prompt.py."""
    out = tmp_path / "x.png"
    for value in ("blurry", ""):
        result = CliRunner().invoke(run_cli, ["a red circle", "--negative-prompt", value, "-o", str(out), "--quiet"])
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: --negative-prompt must be left out"), result.output
        assert "learned null text" in lines[0] and "DeepFloyd IF" in lines[0] and not out.exists()


def test_cli_bad_bundle_subprocess_exit_2(tmp_path):
    command = [
        PYTHON,
        "-m",
        "imagen.runtime.cli",
        "a",
        "--bundle",
        str(tmp_path / "missing"),
        "-o",
        str(tmp_path / "a.png"),
    ]
    out = subprocess.run(command, capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and out.stderr.startswith("error: "), out.stderr
    debug = subprocess.run([*command, "--debug"], capture_output=True, text=True)
    assert debug.returncode == 2 and "Traceback" in debug.stderr


def test_providers_asked_for_by_name_are_never_dropped_silently(bundle_fp32, tmp_path):
    """ONNX Runtime only warns when a provider it lacks is named, then runs on the CPU: the backend
    refuses instead, and imagen-run says what to install; cpu and auto run here."""
    import onnxruntime as ort

    from imagen.runtime.backends import PROVIDER_SETS, OnnxRuntimeBackend
    from imagen.runtime.errors import BackendError

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    bundle = load_bundle(bundle_fp32)
    stage = bundle.stages["unet_0"]
    with pytest.raises(BackendError, match=r"onnxruntime .* cannot use CUDAExecutionProvider here"):
        OnnxRuntimeBackend(bundle.path(stage.file), stage.signature, providers=PROVIDER_SETS["cuda"])
    common = ["a red circle", "--bundle", str(bundle_fp32), "--steps", "2", "--seed", "1", "--quiet"]
    for name in ("cuda", "tensorrt"):
        refused = CliRunner().invoke(run_cli, [*common, "--providers", name, "-o", str(tmp_path / f"{name}.png")])
        lines = refused.output.strip().splitlines()
        assert refused.exit_code == 2 and len(lines) == 1 and "onnxruntime-gpu" in lines[0], refused.output
        assert not (tmp_path / f"{name}.png").exists()
    assert not (bundle_fp32 / "ort-tensorrt-cache").exists()  # refused before anything is written into it
    for name in ("cpu", "auto"):
        made = CliRunner().invoke(run_cli, [*common, "--providers", name, "-o", str(tmp_path / f"{name}.png")])
        assert made.exit_code == 0 and (tmp_path / f"{name}.png").stat().st_size > 0, made.output
