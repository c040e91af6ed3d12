"""imagen.runtime: import isolation, tokenizer, schedule, samplers, guidance, resize against the
PyTorch reference; bundle verification; parameter, signature and non-finite errors; the CLI."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from imagen.runtime import Pipeline, errors, load_bundle
from imagen.runtime.backends import OnnxRuntimeBackend, check_feeds
from imagen.runtime.contract import text_encoder_signature, unet_signature
from imagen.runtime.cli import main as run_cli
from imagen.runtime.errors import (
    BundleError,
    NonFiniteError,
    ParameterError,
    PromptError,
    SignatureError,
)
from imagen.runtime.guidance import apply_guidance, dynamic_threshold
from imagen.runtime.images import resize_image
from imagen.runtime.samplers import run_sampler, spaced_timesteps
from imagen.runtime.schedule import Schedule
from imagen.runtime.tokenizer import Tokenizer

PYTHON = sys.executable
ROOT = Path(__file__).parent.parent


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


# Import isolation


def test_runtime_imports_no_torch_transformers_onnx_reference_or_export():
    code = (
        "import imagen.runtime, imagen.runtime.cli, sys; from imagen.runtime import Pipeline; "
        "bad=[m for m in sys.modules if m.split('.')[0] in ('torch','transformers','onnx') "
        "or m.startswith(('imagen.reference','imagen.export'))]; print(bad)"
    )
    out = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_runtime_sources_do_not_mention_forbidden_imports():
    for path in (ROOT / "runtime").glob("*.py"):
        for line in path.read_text().splitlines():
            stripped = line.strip()
            if stripped.startswith(("import ", "from ")):
                words = stripped.replace(",", " ").split()
                assert not any(
                    w in ("torch", "transformers", "onnx")
                    or w.startswith(("torch.", "onnx.", "imagen.reference", "imagen.export"))
                    for w in words
                ), (path.name, line)
            assert "assert " not in stripped or stripped.startswith("#"), (path.name, line)


# Tokenizer

PROMPTS = [
    "a red circle",
    "Ünïcödé façade – 日本語の文 🎨🖌️",
    "x",
    "tab\tand\nnewline",
    "a" * 23,
    "a" * 24,
    "b" * 200,
    "ümlaut " * 10,
    "  leading and trailing  ",
]


@pytest.mark.parametrize("length", [2, 8, 24, 64])
def test_byte_tokenizer_matches_reference_token_for_token(length):
    from imagen.reference.text_encoder import ByteTokenizer

    reference = ByteTokenizer(length)
    runtime = Tokenizer("byte", length)
    ids, mask, truncated = runtime(PROMPTS)
    ref_ids, ref_mask, ref_truncated = reference(PROMPTS)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(mask, ref_mask)
    assert truncated == ref_truncated
    assert ids.dtype == np.int64 and mask.dtype == np.int64 and ids.shape == (len(PROMPTS), length)
    # the long prompts are cut and say so; a prompt of exactly L - 1 bytes is not
    expected = [len(p.encode("utf-8")) > length - 1 for p in PROMPTS]
    assert truncated == expected
    if length == 24:
        assert truncated[PROMPTS.index("a" * 23)] is False and truncated[PROMPTS.index("a" * 24)] is True


def test_sentencepiece_tokenizer_matches_reference(tmp_path):
    sentencepiece = pytest.importorskip("sentencepiece")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(
        "\n".join(
            [
                "a red circle on a blue square",
                "two green triangles",
                "a small yellow star",
                "the big purple hexagon left of the circle",
            ]
            * 50
        )
    )
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(tmp_path / "spiece"),
        vocab_size=30,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        minloglevel=3,
    )
    from imagen.reference.text_encoder import SentencePieceTokenizer

    reference = SentencePieceTokenizer(tmp_path / "spiece.model", 12)
    runtime = Tokenizer("sentencepiece", 12, model_file=tmp_path / "spiece.model")
    prompts = ["a red circle", "two green triangles on a big purple hexagon left of the circle", "ünknown"]
    for got, want in zip(runtime(prompts), reference(prompts), strict=False):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize(
    "prompt,reason",
    [
        ("", "empty"),
        ("   \n\t", "empty"),
        ("bad \ud800 surrogate", "surrogate"),
        ("bell \x07", "control"),
        ("nul \x00", "control"),
        ("del \x7f", "control"),
        ("c1 \x85", "control"),
        ("cr \r", "control"),
        (b"bytes", "bytes"),
        (None, "str"),
        (12, "str"),
    ],
)
def test_bad_prompts_raise_prompt_error(prompt, reason):
    with pytest.raises(PromptError, match=reason):
        Tokenizer("byte", 16)([prompt])


def test_strict_rejects_long_prompt_and_default_truncates():
    tokenizer = Tokenizer("byte", 8)
    with pytest.raises(PromptError, match="at most 7"):
        tokenizer(["a long prompt"], strict=True)
    ids, mask, truncated = tokenizer(["a long prompt"])
    assert truncated == [True] and ids[0, -1] == 1 and mask.sum() == 8
    assert tokenizer(["short"], strict=True)[2] == [False]


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=40), st.text(st.characters(blacklist_categories=()), max_size=20),
                 st.binary(max_size=8), st.integers(), st.none(), st.lists(st.text(max_size=3), max_size=2)))
def test_any_input_tokenizes_or_raises_prompt_error(prompt):
    tokenizer = Tokenizer("byte", 16)
    try:
        ids, mask, truncated = tokenizer([prompt])
    except PromptError:
        return
    assert isinstance(prompt, str) and prompt.strip()
    np.testing.assert_array_equal(ids, _reference_byte_tokenizer(16)([prompt])[0])
    n = int(mask.sum())
    assert 2 <= n <= 16 and mask[0, :n].all() and not mask[0, n:].any()
    assert ids[0, n - 1] == 1 and (ids[0, n:] == 0).all() and (ids[0, : n - 1] >= 3).all()
    assert (ids[0, : n - 1] < 259).all()
    assert truncated == [len(prompt.encode("utf-8")) > 15]


def _reference_byte_tokenizer(length):
    from imagen.reference.text_encoder import ByteTokenizer

    return ByteTokenizer(length)


# Schedule


@pytest.mark.parametrize("kind,timesteps", [("linear", 1000), ("linear", 30), ("cosine", 50)])
def test_schedule_matches_reference_buffers(kind, timesteps):
    from imagen.reference.diffusion import GaussianDiffusion

    reference = GaussianDiffusion(timesteps=timesteps, schedule=kind)
    from imagen.runtime.contract import ScheduleEntry

    written = ScheduleEntry(tuple(reference.betas_array.tolist()), kind, timesteps).to_json()
    schedule = Schedule(ScheduleEntry.from_json("unet_0", json.loads(json.dumps(written))).betas)
    for name in (
        "betas",
        "alphas_cumprod",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
    ):
        ours, theirs = getattr(schedule, name), getattr(reference, name).numpy()
        assert ours.dtype == np.float64
        np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=0, err_msg=name)


@pytest.mark.parametrize("steps", [1, 2, 5, 7, 29, 30])
def test_timesteps_match_reference(steps):
    from imagen.reference.samplers import spaced_timesteps as reference_timesteps

    ours = spaced_timesteps(30, steps)
    assert ours == reference_timesteps(30, steps)
    assert ours[0] == 29 and ours[-1] == (0 if steps > 1 else 29)


@pytest.mark.parametrize("steps,strength,kept", [(25, 0.6, 15), (30, 0.5, 15), (5, 0.01, 1), (7, 1.0, 7), (1, 0.5, 1)])
def test_sr_strength_keeps_the_last_steps(steps, strength, kept):
    from imagen.reference.samplers import spaced_timesteps as reference_timesteps

    ours = spaced_timesteps(30, steps, strength)
    assert ours == reference_timesteps(30, steps, strength)
    assert len(ours) == kept and ours == spaced_timesteps(30, steps)[steps - kept:]
    with pytest.raises(ValueError, match="strength"):
        spaced_timesteps(30, steps, 0.0)


# Guidance, dynamic thresholding, resize


@pytest.mark.parametrize("seed", range(3))
def test_guidance_and_dynamic_threshold_match_reference(seed):
    import torch
    from imagen.reference.guidance import apply_guidance as ref_guidance
    from imagen.reference.guidance import dynamic_threshold as ref_threshold

    rng = np.random.default_rng(seed)
    cond, uncond = (rng.standard_normal((3, 3, 8, 8), dtype=np.float32) * 2 for _ in range(2))
    for scale in (0.0, 1.0, 5.0, 7.5):
        ours = apply_guidance(cond, uncond, scale)
        theirs = ref_guidance(torch.from_numpy(cond), torch.from_numpy(uncond), scale).numpy()
        assert ours.dtype == np.float32
        np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)
    x0 = (
        rng.standard_normal((4, 3, 16, 16), dtype=np.float32)
        * np.array([0.3, 1.0, 2.0, 5.0], np.float32)[:, None, None, None]
    )
    for p in (0.5, 0.9, 0.995):
        ours = dynamic_threshold(x0, p)
        theirs = ref_threshold(torch.from_numpy(x0), p).numpy()
        assert ours.dtype == np.float32 and ours.shape == x0.shape
        np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)
        assert np.abs(ours).max() <= 1.0 + 1e-6
    np.testing.assert_array_equal(dynamic_threshold(x0[:1] * 0.1, 0.9), x0[:1] * 0.1)  # s = 1: unchanged


@pytest.mark.parametrize("n_in,n_out", [(16, 32), (8, 64), (5, 13), (32, 32), (3, 4)])
def test_resize_matches_reference(n_in, n_out):
    import torch
    from imagen.reference.images import resize_image as ref_resize

    x = np.random.default_rng(n_in * n_out).standard_normal((2, 3, n_in, n_in), dtype=np.float32)
    ours = resize_image(x, n_out)
    theirs = ref_resize(torch.from_numpy(x), n_out).numpy()
    assert ours.shape == (2, 3, n_out, n_out) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)


# Samplers against their reference twins


def _fake_denoise_np(x, t):
    return np.float32(0.9 - 0.002 * t) * x + np.float32(0.01 * t)


def _fake_denoise_torch(x, t):
    import torch

    return torch.tensor(0.9 - 0.002 * t, dtype=torch.float32) * x + torch.tensor(
        0.01 * t, dtype=torch.float32
    )


@pytest.mark.parametrize(
    "sampler,steps,eta",
    [
        ("ddpm", 30, 0.0),
        ("ddpm", 5, 0.0),
        ("ddim", 5, 0.0),
        ("ddim", 7, 0.5),
        ("ddim", 4, 1.0),
        ("dpmpp_2m", 5, 0.0),
        ("dpmpp_2m", 1, 0.0),
        ("dpmpp_2m", 12, 0.0),
    ],
)
def test_sampler_matches_reference_every_step(sampler, steps, eta):
    import torch
    from imagen.reference.diffusion import GaussianDiffusion
    from imagen.reference.imagen import make_noise_source
    from imagen.reference.samplers import run_sampler as ref_run_sampler

    reference = GaussianDiffusion(timesteps=30, schedule="linear")
    schedule = Schedule(reference.betas_array)
    timesteps = spaced_timesteps(schedule.num_timesteps, steps)
    start = np.random.default_rng(1).standard_normal((2, 3, 8, 8), dtype=np.float32)
    ours, theirs = [], []
    gen_a, gen_b = (np.random.Generator(np.random.PCG64(7)) for _ in range(2))
    out = run_sampler(
        sampler,
        _fake_denoise_np,
        start.copy(),
        schedule.alphas_cumprod,
        timesteps,
        lambda shape: gen_a.standard_normal(shape, dtype=np.float32),
        eta,
        lambda i, t, x: ours.append((i, t, x.copy())),
    )
    ref_out = ref_run_sampler(
        sampler,
        _fake_denoise_torch,
        torch.from_numpy(start.copy()),
        reference.alphas_cumprod.numpy(),
        timesteps,
        make_noise_source(gen_b),
        eta,
        lambda i, t, x: theirs.append((i, t, x.numpy().copy())),
    )
    assert len(ours) == len(theirs) == steps
    for (i, t, x), (j, u, y) in zip(ours, theirs, strict=False):
        assert (i, t) == (j, u) and x.dtype == np.float32
        assert rel(x, y) <= 1e-5, (sampler, i, t, rel(x, y))
    assert rel(out, ref_out.numpy()) <= 1e-5
    # both drew the same number of noise arrays
    assert gen_a.bit_generator.state == gen_b.bit_generator.state



# A hand-made bundle: files with arbitrary bytes, a valid manifest (no real models needed for verification)

SIZES, LENGTH, WIDTH, T = (8, 16), 8, 4, 30


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _spec(entries):
    return [{"name": n, "dtype": d, "shape": list(s)} for n, d, s in entries]


def make_bundle(root: Path, max_batch: int = 4) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    betas = list(np.linspace(1000 / T * 1e-4, 1000 / T * 0.02, T))
    stages = {}
    for index, name in enumerate(["text_encoder"] + [f"unet_{i}" for i in range(len(SIZES))]):
        data = f"not really onnx: {name}".encode() * (index + 1)
        (root / f"{name}.onnx").write_bytes(data)
        unet = None if name == "text_encoder" else index - 1
        size = SIZES[unet] if unet is not None else 0
        signature = (
            text_encoder_signature(LENGTH, WIDTH, max_batch)
            if unet is None
            else unet_signature(unet, size, LENGTH, WIDTH, unet > 0, max_batch)
        ).to_json()
        stage = {
            "file": f"{name}.onnx",
            "bytes": len(data),
            "sha256": _sha(data),
            "precision": "fp32",
            **signature,
            "parity": {
                "batch_sizes": [1, 3],
                "rel_error": [0, 0],
                "tolerance": 1e-5,
                "passed": True,
                "forced": False,
            },
            "flops": 1,
        }
        if unet is not None:
            stage.update(image_size=size, lowres_cond=unet > 0)
        stages[name] = stage
    manifest = {
        "format": "imagen-bundle",
        "format_version": 1,
        "producer": {"imagen": "0.1.0", "torch": None, "onnx": None, "onnxruntime": None, "tensorrt": None},
        "channels": 3,
        "image_sizes": list(SIZES),
        "text": {"max_length": LENGTH, "embed_dim": WIDTH},
        "tokenizer": {
            "kind": "byte",
            "max_length": LENGTH,
            "pad_id": 0,
            "eos_id": 1,
            "offset": 3,
            "files": {},
        },
        "schedules": {
            "unet_0": {"kind": "linear", "timesteps": T, "betas": betas},
            "unet_1": {"kind": "linear", "timesteps": T, "betas": betas},
            "lowres": {"kind": "linear", "timesteps": T, "betas": betas},
        },
        "defaults": {
            "guidance_scale": 5.0,
            "dynamic_thresholding_percentile": 0.9,
            "lowres_sample_noise_level": 0.2,
            "sampler": "ddpm",
            "steps": None,
        },
        "stages": stages,
        "tensorrt": None,
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return root


def edit_manifest(root: Path, change) -> None:
    manifest = json.loads((root / "manifest.json").read_text())
    change(manifest)
    (root / "manifest.json").write_text(json.dumps(manifest))


class FakeBackend:
    """Checks feeds like a real backend; a fixed function of the inputs as output."""

    def __init__(self, stage, nan_at_call: int | None = None):
        self.stage, self.calls, self.nan_at_call = stage, 0, nan_at_call

    def run(self, feeds):
        check_feeds(self.stage, feeds)
        self.calls += 1
        if self.stage.name == "text_encoder":
            mask = feeds["attention_mask"].astype(np.float32)
            ids = feeds["input_ids"].astype(np.float32)
            return {"text_embeds": np.repeat((mask * ids / 100)[:, :, None], WIDTH, axis=2)}
        x = feeds["x"]
        keep = feeds["text_keep"].astype(np.float32)[:, None, None, None]
        pred = (
            np.float32(0.2) * x
            + np.float32(0.05) * keep
            + feeds["time"][:, None, None, None] * np.float32(1e-3)
        )
        if "lowres_cond_img" in feeds:
            pred = pred + np.float32(0.1) * feeds["lowres_cond_img"]
        if self.nan_at_call is not None and self.calls - 1 == self.nan_at_call:
            pred = pred.copy()
            pred[0, 0, 0, 0] = np.nan
        return {"noise_pred": pred.astype(np.float32)}


def fake_pipeline(root: Path) -> Pipeline:
    bundle = load_bundle(root)
    return Pipeline(bundle, {name: FakeBackend(stage.signature) for name, stage in bundle.stages.items()})


@pytest.fixture
def fake_bundle(tmp_path):
    return make_bundle(tmp_path / "bundle")


@pytest.fixture
def no_sessions(monkeypatch):
    import onnxruntime

    def refuse(*args, **kwargs):
        raise AssertionError("an InferenceSession was created before the bundle was verified")

    monkeypatch.setattr(onnxruntime, "InferenceSession", refuse)


def test_hand_made_bundle_verifies(fake_bundle):
    bundle = load_bundle(fake_bundle)
    assert list(bundle.stages) == ["text_encoder", "unet_0", "unet_1"]
    assert bundle.max_batch == 4 and bundle.manifest.image_sizes == SIZES
    assert bundle.short_sha == _sha((fake_bundle / "manifest.json").read_bytes())[:16]


def _corrupt_sha(root):
    (root / "unet_0.onnx").write_bytes(b"X" * (root / "unet_0.onnx").stat().st_size)


def _truncate(root):
    data = (root / "unet_1.onnx").read_bytes()
    (root / "unet_1.onnx").write_bytes(data[:-3])


def _escape_symlink(root):
    outside = root.parent / "outside.onnx"
    outside.write_bytes((root / "unet_0.onnx").read_bytes())
    (root / "unet_0.onnx").unlink()
    (root / "unet_0.onnx").symlink_to(outside)


def _remove_stage(root):
    edit_manifest(root, lambda m: m["stages"].pop("unet_1"))


def _set(path, value):
    def change(manifest):
        node = manifest
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return change


def _width(manifest):
    manifest["stages"]["unet_1"]["inputs"][2]["shape"] = ["batch", LENGTH, WIDTH + 1]


def _lowres_on_base(manifest):
    manifest["stages"]["unet_0"]["inputs"] = manifest["stages"]["unet_1"]["inputs"][:]
    for spec in manifest["stages"]["unet_0"]["inputs"]:
        if spec["name"] in ("x", "lowres_cond_img"):
            spec["shape"] = ["batch", 3, 8, 8]


BROKEN = {
    "wrong sha256": (_corrupt_sha, r"unet_0\.onnx.*sha256 [0-9a-f]{64}.*expects [0-9a-f]{64}.*re-export"),
    "truncated file": (_truncate, r"unet_1\.onnx.*has \d+ bytes.*expects \d+.*re-export"),
    "symlink escaping": (_escape_symlink, r"unet_0\.onnx.*outside the bundle"),
    "missing stage": (_remove_stage, r"manifest\.json.*stage 'unet_1' is missing"),
    "unknown version": (
        lambda r: edit_manifest(r, _set(["format_version"], 2)),
        r"manifest\.json.*format_version 2.*supported: 1.*re-export",
    ),
    "not json": (lambda r: (r / "manifest.json").write_text("{nope"), r"manifest\.json is not valid JSON"),
    "dotdot path": (
        lambda r: edit_manifest(r, _set(["stages", "unet_0", "file"], "../unet_0.onnx")),
        r"'\.\./unet_0\.onnx' contains '\.\.'",
    ),
    "absolute path": (
        lambda r: edit_manifest(r, _set(["stages", "unet_0", "file"], str(r / "unet_0.onnx"))),
        r"unet_0\.onnx.*absolute path",
    ),
    "missing file": (lambda r: (r / "text_encoder.onnx").unlink(), r"text_encoder\.onnx.*missing"),
    "embed width": (lambda r: edit_manifest(r, _width), r"unet_1\.onnx.*text_embeds of width 5.*width 4"),
    "wrong image size": (lambda r: edit_manifest(r, _set(["image_sizes"], [8, 32])), r"unet_1"),
    "lowres inputs on base": (lambda r: edit_manifest(r, _lowres_on_base), r"unet_0\.onnx.*lowres_cond_img"),
    "wrong dtype": (
        lambda r: edit_manifest(r, _set(["stages", "unet_0", "inputs", 3, "dtype"], "int64")),
        r"unet_0\.onnx.*text_mask is int64.*expects bool",
    ),
    "not an imagen bundle": (lambda r: edit_manifest(r, _set(["format"], "other")), r"not 'imagen-bundle'"),
    "missing manifest": (lambda r: (r / "manifest.json").unlink(), r"no manifest\.json"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_bundles_raise_bundle_error_before_any_session(case, fake_bundle, no_sessions):
    breaker, pattern = BROKEN[case]
    breaker(fake_bundle)
    with pytest.raises(BundleError, match=pattern):
        load_bundle(fake_bundle)
    with pytest.raises(BundleError, match=pattern):
        Pipeline.load(fake_bundle, backend="onnxruntime")


def test_tokenizer_files_are_hashed(fake_bundle):
    (fake_bundle / "tokenizer").mkdir()
    (fake_bundle / "tokenizer" / "spiece.model").write_bytes(b"model")
    entry = {"file": "tokenizer/spiece.model", "bytes": 5, "sha256": _sha(b"other")}
    edit_manifest(fake_bundle, _set(["tokenizer", "files"], {"spiece.model": entry}))
    with pytest.raises(BundleError, match=r"spiece\.model.*sha256"):
        load_bundle(fake_bundle)


def test_missing_bundle_and_demo(tmp_path, monkeypatch):
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "nope")
    from imagen.runtime import pipeline as pipeline_module

    monkeypatch.setattr(pipeline_module, "DEMO_BUNDLE", tmp_path / "no-demo")
    with pytest.raises(BundleError, match="no built-in demo bundle.*--bundle PATH"):
        Pipeline.load()


# The pipeline over fake backends: parameters, determinism, non-finite outputs


def test_fake_pipeline_runs_and_is_deterministic(fake_bundle):
    pipe = fake_pipeline(fake_bundle)
    seen = []
    result = pipe(
        ["a red circle", "ü"],
        steps=3,
        seed=5,
        num_images_per_prompt=2,
        callback=lambda s, i, t, x: seen.append((s, i, t, x.shape)),
    )
    assert result.array.shape == (4, 16, 16, 3) and result.array.dtype == np.uint8
    assert len(result.images) == 4 and result.images[0].size == (16, 16)
    assert [i["prompt"] for i in result.info] == ["a red circle", "a red circle", "ü", "ü"]
    assert result.info[0]["steps"] == [3, 3] and result.info[0]["seed"] == 5
    assert result.info[0]["bundle_sha"] == load_bundle(fake_bundle).short_sha
    timings = result.info[0]["timings"]
    assert set(timings) == {"tokenize", "text", "engine", "engine_calls", "engine:text_encoder", "engine:unet_0",
                            "engine:unet_1", "resize", "unet_0", "unet_1", "total"}
    assert timings["engine_calls"] == sum(backend.calls for backend in pipe.backends.values()) == 1 + 3 + 3
    assert 0 <= timings["engine:unet_0"] <= timings["unet_0"] and 0 <= timings["engine"] <= timings["total"]
    assert [(s, i, t) for s, i, t, _ in seen] == [
        (0, 0, 29),
        (0, 1, 14),
        (0, 2, 0),
        (1, 0, 29),
        (1, 1, 14),
        (1, 2, 0),
    ]
    again = pipe(["a red circle", "ü"], steps=3, seed=5, num_images_per_prompt=2)
    np.testing.assert_array_equal(result.array, again.array)
    other = pipe(["a red circle", "ü"], steps=3, seed=6, num_images_per_prompt=2)
    assert not np.array_equal(result.array, other.array)
    drawn = pipe("x", steps=1)
    assert isinstance(drawn.info[0]["seed"], int) and 0 <= drawn.info[0]["seed"] < 2**63


def test_guidance_scale_one_sends_only_cond_rows(fake_bundle):
    pipe = fake_pipeline(fake_bundle)
    rows = []
    backend = pipe.backends["unet_0"]
    original = backend.run
    backend.run = lambda feeds: rows.append(feeds["text_keep"].copy()) or original(feeds)
    pipe(["a", "b"], steps=2, seed=0, guidance_scale=1.0)
    pipe(["a", "b"], steps=2, seed=0, guidance_scale=3.0)
    assert [r.tolist() for r in rows] == [[True, True]] * 2 + [[True, True, False, False]] * 2


BAD_PARAMETERS = [
    ("prompts", {"prompts": 5}),
    ("prompts", {"prompts": ["a"] * 5}),
    ("prompts", {"prompts": []}),
    ("num_images_per_prompt", {"num_images_per_prompt": 0}),
    ("num_images_per_prompt", {"num_images_per_prompt": 5}),
    ("prompts", {"prompts": ["a", "b", "c"], "num_images_per_prompt": 2}),
    ("num_images_per_prompt", {"num_images_per_prompt": 1.0}),
    ("steps", {"steps": 0}),
    ("steps", {"steps": 31}),
    ("steps", {"steps": True}),
    ("steps", {"steps": 2.0}),
    ("steps", {"steps": [3]}),
    ("guidance_scale", {"guidance_scale": -1.0}),
    ("guidance_scale", {"guidance_scale": float("nan")}),
    ("guidance_scale", {"guidance_scale": float("inf")}),
    ("guidance_scale", {"guidance_scale": "5"}),
    ("seed", {"seed": -1}),
    ("seed", {"seed": 2**63}),
    ("seed", {"seed": 1.5}),
    ("seed", {"seed": True}),
    ("sampler", {"sampler": "euler"}),
    ("eta", {"eta": -0.1}),
    ("eta", {"eta": float("nan")}),
    ("sr_strength", {"sr_strength": 0}),
    ("sr_strength", {"sr_strength": 1.5}),
    ("sr_strength", {"sr_strength": float("nan")}),
    ("sr_strength", {"sr_strength": True}),
    ("sr_strength", {"sr_strength": "0.5"}),
]


@pytest.mark.parametrize("name,kwargs", BAD_PARAMETERS, ids=[f"{n}-{k}" for n, k in BAD_PARAMETERS])
def test_bad_parameters_raise_parameter_error_naming_them(name, kwargs, fake_bundle):
    pipe = fake_pipeline(fake_bundle)
    kwargs = dict(kwargs)
    prompts = kwargs.pop("prompts", "a prompt")
    with pytest.raises(ParameterError, match=rf"^{name} must be") as info:
        pipe(prompts, **kwargs)
    assert info.value.parameter == name
    assert pipe.backends["text_encoder"].calls == 0  # rejected before any stage ran


def test_bundle_default_sr_strength_is_used_and_counted(fake_bundle):
    pipe = fake_pipeline(fake_bundle)
    assert pipe.model_calls(pipe.settings(steps=10)) == [10, 10]
    full = pipe("a prompt", steps=10, seed=3)
    edit_manifest(fake_bundle, lambda m: m["defaults"].update(sr_strength=0.3))
    pipe = fake_pipeline(fake_bundle)
    assert pipe.model_calls(pipe.settings(steps=10)) == [10, 3]
    assert pipe.model_calls(pipe.settings(steps=10, sr_strength=1)) == [10, 10]
    calls = []
    short = pipe("a prompt", steps=10, seed=3, callback=lambda u, i, t, x: calls.append((u, t)))
    assert [t for u, t in calls if u == 1] == spaced_timesteps(T, 10)[-3:]
    assert short.info[0]["sr_strength"] == 0.3 and full.info[0]["sr_strength"] == 1.0
    assert not np.array_equal(short.array, full.array)
    np.testing.assert_array_equal(pipe("a prompt", steps=10, seed=3, sr_strength=1.0).array, full.array)


def test_parameter_checks_hold_under_python_O(fake_bundle, tmp_path):
    script = tmp_path / "check.py"
    script.write_text(
        f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from pathlib import Path
from test_runtime import fake_pipeline, BAD_PARAMETERS
from imagen.runtime.errors import ParameterError, PromptError
assert False, "asserts are on"
""".replace('assert False, "asserts are on"', "")
        + f"""
pipe = fake_pipeline(Path({str(fake_bundle)!r}))
caught = []
for name, kwargs in BAD_PARAMETERS:
    kwargs = dict(kwargs)
    try:
        pipe(kwargs.pop("prompts", "a"), **kwargs)
    except ParameterError as error:
        caught.append(error.parameter == name)
try:
    pipe("bell \\x07", steps=1)
except PromptError:
    caught.append(True)
print(sys.flags.optimize, len(caught), all(caught))
"""
    )
    out = subprocess.run([PYTHON, "-O", str(script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", str(len(BAD_PARAMETERS) + 1), "True"], out.stdout


@pytest.mark.parametrize("stage,nan_at,step", [("unet_0", 1, 1), ("unet_1", 2, 2), ("unet_0", 0, 0)])
def test_non_finite_output_names_stage_and_step_and_pipeline_recovers(stage, nan_at, step, fake_bundle):
    pipe = fake_pipeline(fake_bundle)
    good = pipe("a prompt", steps=3, seed=1).array
    healthy = pipe.backends[stage]
    pipe.backends[stage] = FakeBackend(healthy.stage, nan_at_call=nan_at)
    with pytest.raises(NonFiniteError, match=rf"{stage} at step {step}") as info:
        pipe("a prompt", steps=3, seed=1)
    assert info.value.stage == stage and info.value.step == step
    assert isinstance(info.value, FloatingPointError)
    pipe.backends[stage] = healthy
    np.testing.assert_array_equal(pipe("a prompt", steps=3, seed=1).array, good)


def test_non_finite_text_embeds(fake_bundle):
    pipe = fake_pipeline(fake_bundle)
    pipe.backends["text_encoder"].run = lambda feeds: {
        "text_embeds": np.full((1, LENGTH, WIDTH), np.inf, np.float32)
    }
    with pytest.raises(NonFiniteError, match="text_encoder"):
        pipe("a", steps=1, seed=0)


def test_errors_are_typed():
    assert issubclass(errors.PromptError, ValueError) and issubclass(errors.ParameterError, ValueError)
    assert issubclass(errors.SignatureError, ValueError) and issubclass(errors.BackendError, RuntimeError)
    for name in (
        "BundleError",
        "PromptError",
        "ParameterError",
        "SignatureError",
        "NonFiniteError",
        "BackendError",
    ):
        assert issubclass(getattr(errors, name), errors.ImagenError)


def test_tensorrt_backend_reports_why_it_is_unavailable(fake_bundle):
    try:
        import tensorrt  # noqa: F401

        pytest.skip("tensorrt is installed here; this test covers machines without it")
    except ImportError:
        pass
    with pytest.raises(errors.BackendError, match="tensorrt"):
        Pipeline.load(fake_bundle, backend="tensorrt")


# Real bundle: signatures at the backend, CLI


def _unet_feeds(batch=2, size=16, length=24, width=128):
    rng = np.random.default_rng(0)
    return {
        "x": rng.standard_normal((batch, 3, size, size), dtype=np.float32),
        "time": np.full((batch,), 3.0, np.float32),
        "text_embeds": rng.standard_normal((batch, length, width), dtype=np.float32),
        "text_mask": np.ones((batch, length), bool),
        "text_keep": np.ones((batch,), bool),
    }


def test_backend_raises_signature_error(bundle_fp32):
    bundle = load_bundle(bundle_fp32)
    stage = bundle.stages["unet_0"]
    backend = OnnxRuntimeBackend(bundle.path(stage.file), stage.signature, threads=1)
    manifest = bundle.manifest
    width, length, size = manifest.embed_dim, manifest.max_length, manifest.image_sizes[0]
    good = _unet_feeds(2, size, length, width)
    assert backend.run(good)["noise_pred"].shape == (2, 3, size, size)
    cases = {
        "must be float32, got float64": {**good, "x": good["x"].astype(np.float64)},
        "text_mask must be bool": {**good, "text_mask": good["text_mask"].astype(np.int64)},
        "dimension 2 must be": {**good, "x": good["x"][:, :, :-1]},
        "rank": {**good, "time": good["time"][:, None]},
        "missing \\['text_keep'\\]": {k: v for k, v in good.items() if k != "text_keep"},
        "unexpected \\['extra'\\]": {**good, "extra": good["time"]},
        "has batch 1": {**good, "time": good["time"][:1]},
        "batch 9 is outside \\[1, 8\\]": _unet_feeds(9, size, length, width),
    }
    for pattern, feeds in cases.items():
        with pytest.raises(SignatureError, match=pattern):
            backend.run(feeds)


def test_real_bundle_nan_names_stage_and_step_then_recovers(bundle_fp32):
    pipe = Pipeline.load(bundle_fp32, backend="onnxruntime", threads=1)
    good = pipe("a red circle", steps=3, seed=3).array
    real = pipe.backends["unet_1"]

    class NanAtStep:
        def __init__(self):
            self.calls = 0

        def run(self, feeds):
            out = real.run(feeds)
            self.calls += 1
            if self.calls == 2:
                out = {"noise_pred": np.full_like(out["noise_pred"], np.nan)}
            return out

    pipe.backends["unet_1"] = NanAtStep()
    with pytest.raises(NonFiniteError, match=r"unet_1 at step 1"):
        pipe("a red circle", steps=3, seed=3)
    pipe.backends["unet_1"] = real
    np.testing.assert_array_equal(pipe("a red circle", steps=3, seed=3).array, good)


def test_cli_sr_strength(bundle_fp32, tmp_path):
    from PIL import Image

    out = tmp_path / "out.png"
    common = ["a red circle", "--bundle", str(bundle_fp32), "--steps", "4", "--seed", "2", "--threads", "1"]
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
    assert (
        image.text["bundle_sha"] == load_bundle(bundle_fp32).short_sha
        and float(image.text["guidance"]) == 5.0
    )
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


def test_cli_bad_bundle_subprocess_exit_2(tmp_path):
    out = subprocess.run(
        [
            PYTHON,
            "-m",
            "imagen.runtime.cli",
            "a",
            "--bundle",
            str(tmp_path / "missing"),
            "-o",
            str(tmp_path / "a.png"),
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and out.stderr.startswith("error: "), (
        out.stderr
    )
    debug = subprocess.run(
        [
            PYTHON,
            "-m",
            "imagen.runtime.cli",
            "a",
            "--bundle",
            str(tmp_path / "missing"),
            "-o",
            str(tmp_path / "a.png"),
            "--debug",
        ],
        capture_output=True,
        text=True,
    )
    assert debug.returncode == 2 and "Traceback" in debug.stderr
