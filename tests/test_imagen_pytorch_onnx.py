"""imagen-pytorch Unets -> ONNX (export/imagen_pytorch_onnx.py): every Unet of the tiny `Imagen` and
`ElucidatedImagen` cascades that imagen-pytorch 2.1.0 trained and saved itself (tests/imagen_pytorch_tiny.py)
is written by the exporter's child process, and the written files, run by ONNX Runtime, are held against
imagen-pytorch's own Unets (`load_imagen_from_checkpoint`, run in another child process): a row whose
`text_keep` is true against the Unet with `cond_drop_prob=0`, a dropped row against `cond_drop_prob=1`, in
one mixed batch with padded text masks. The test process never imports imagen_pytorch.

Measured: FP32 files within 3.1e-6 of imagen-pytorch (relative, per row), the FP16 one within 5e-3. Each
Unet export takes about 20 s on 2 cores (torch.export and the ONNX optimizer), so the FP16 export is `slow`.
Without imagen-pytorch installed the tests skip (see tests/test_imagen_pytorch_checkpoint.py for the install).
"""

import inspect
import os
import sys

import numpy as np
import pytest
from imagen_pytorch_tiny import EMBED_DIM, MAX_TEXT_LEN, missing_packages, run_upstream_unets
from torch import nn

from imagen.export import imagen_pytorch_onnx
from imagen.export.errors import ExportError
from imagen.export.imagen_pytorch import read_imagen_pytorch
from imagen.export.imagen_pytorch_onnx import (
    WORK,
    ImagenPytorchSRUnetStage,
    ImagenPytorchUnetStage,
    t5_config_offline,
    text_kept,
    unet_stage,
    write_imagen_pytorch_unets,
)
from imagen.export.options import ExportOptions
from imagen.export.parity import relative_error
from imagen.export.staging import TOLERANCE
from imagen.runtime.contract import unet_signature

pytestmark = pytest.mark.skipif(
    bool(missing_packages()), reason=f"imagen-pytorch 2.1.0 is not installed (missing: {missing_packages()})"
)

KINDS = ("imagen", "elucidated")
# what the runtime feeds as time: Imagen's log-SNR (cosine: -33.9 to 8.8, linear: -10 to 9.2), and
# ElucidatedImagen's c_noise = log(sigma) / 4 over sigma in [0.002, 80]
TIME_RANGES = {"imagen": (-20.0, 10.0), "elucidated": (-1.6, 1.1)}
MAX_BATCH = 2
UPSTREAM_TOLERANCE = 1e-5  # FP32 file vs imagen-pytorch, relative per row (measured: at most 3.1e-6)
TEXT_KEEP = np.array([True, False, True, False])
TEXT_LENGTHS = np.array([MAX_TEXT_LEN, 5, 9, MAX_TEXT_LEN])  # padded rows kept and dropped


def jobs(checkpoint, kind: str) -> list[dict]:
    """One job per Unet, as the bundle writer makes them."""
    out = []
    for stage in checkpoint.stages:
        prediction = "edm" if kind == "elucidated" else stage.schedule.pred_objective
        signature = dict(index=stage.index, image_size=stage.image_size, max_length=MAX_TEXT_LEN)
        signature.update(embed_dim=EMBED_DIM, lowres_cond=stage.lowres_cond, max_batch=MAX_BATCH)
        signature.update(channels=stage.channels, self_cond=stage.self_cond, prediction=prediction)
        out.append(dict(stage=stage.index, signature=signature, input_kwargs={"time_range": TIME_RANGES[kind]}))
    return out


def export(tiny, kind: str, staging, options=None, indexes=None, **read_kwargs):
    checkpoint = read_imagen_pytorch(tiny[kind])
    chosen = [job for job in jobs(checkpoint, kind) if indexes is None or job["stage"] in indexes]
    said = []
    options = options or ExportOptions(max_batch=MAX_BATCH)
    entries = write_imagen_pytorch_unets(tiny[kind], read_kwargs, chosen, staging, options, said.append)
    return dict(entries=entries, jobs=chosen, staging=staging, said=said)


@pytest.fixture(scope="module")
def tiny(imagen_pytorch_files):
    return dict(imagen=imagen_pytorch_files["imagen"], elucidated=imagen_pytorch_files["elucidated"])


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    return {kind: export(tiny, kind, tmp_path_factory.mktemp(f"staging_{kind}")) for kind in KINDS}


def unet_inputs(job: dict, seed: int) -> dict[str, np.ndarray]:
    """A mixed batch: rows with and without text, padded text masks, continuous times in the stage's range."""
    signature = unet_signature(**{**job["signature"], "max_batch": 2})
    rng = np.random.default_rng(seed)
    feeds = signature.sample_inputs(len(TEXT_KEEP), rng, **job["input_kwargs"])
    feeds["text_mask"] = np.arange(MAX_TEXT_LEN)[None, :] < TEXT_LENGTHS[:, None]
    feeds["text_embeds"] *= feeds["text_mask"][..., None]  # zero at padding, as imagen-pytorch's T5 encoding
    feeds["text_keep"] = TEXT_KEEP.copy()
    return feeds


@pytest.fixture(scope="module")
def upstream(tiny, exported, tmp_path_factory):
    """Per kind and Unet: the inputs, and imagen-pytorch's own outputs with the text kept and dropped."""
    inputs = {
        kind: {job["stage"]: unet_inputs(job, seed=job["stage"]) for job in exported[kind]["jobs"]} for kind in KINDS
    }
    flat = {
        tiny[kind]: {f"{i}.{name}": array for i, feeds in inputs[kind].items() for name, array in feeds.items()}
        for kind in KINDS
    }
    outputs = run_upstream_unets(tmp_path_factory.mktemp("upstream"), flat)
    return {kind: (inputs[kind], outputs[tiny[kind]]) for kind in KINDS}


def run_onnx(path, feeds):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return session.run(None, {name: feeds[name] for name in names})[0]


def rows_against_upstream(path, feeds, outputs, index) -> list[float]:
    """Relative error per row of the ONNX file against imagen-pytorch: kept rows against cond_drop_prob=0,
    dropped rows against cond_drop_prob=1."""
    keep, drop = outputs[f"{index}.keep"], outputs[f"{index}.drop"]
    for row in range(len(TEXT_KEEP)):  # the two differ, so a wrong text_keep cannot pass
        assert relative_error(drop[row], keep[row]) > 1e-2
    expected = np.where(TEXT_KEEP[:, None, None, None], keep, drop)
    got = run_onnx(path, feeds)
    assert got.shape == expected.shape
    return [relative_error(got[row], expected[row]) for row in range(len(TEXT_KEEP))]


# --- export and parity


def test_every_unet_exports_within_fp32_tolerance(exported):
    for kind in KINDS:
        result = exported[kind]
        for entry, job in zip(result["entries"], result["jobs"], strict=True):
            print(f"{kind} {entry.name}: parity rel. errors {entry.parity.rel_error}")
            assert entry.name == f"unet_{job['stage']}" and entry.precision == "fp32"
            assert entry.parity.passed and max(entry.parity.rel_error) <= TOLERANCE["fp32"]
            assert entry.signature == unet_signature(**job["signature"])
            assert (entry.image_size, entry.lowres_cond) == (job["signature"]["image_size"], job["stage"] > 0)
            assert (result["staging"] / entry.file.file).stat().st_size == entry.file.bytes
        assert not (result["staging"] / WORK).exists()  # the job's files leave the staging folder
        assert any(line.startswith("unet_1: parity fp32") for line in result["said"])  # progress relayed
    imagen, elucidated = ([e.signature.input_names for e in exported[kind]["entries"]] for kind in KINDS)
    assert imagen[1] == ["x", "time", "text_embeds", "text_mask", "text_keep", "self_cond"] + [
        "lowres_cond_img",
        "lowres_noise_times",
    ]
    assert "self_cond" in elucidated[0] and "self_cond" not in elucidated[1] and "lowres_cond_img" in elucidated[1]
    assert [e.signature.output_names for e in exported["imagen"]["entries"]] == [["noise_pred"], ["v_pred"]]
    assert [e.signature.output_names for e in exported["elucidated"]["entries"]] == [["edm_pred"]] * 2


def test_onnx_runtime_matches_imagen_pytorch(exported, upstream):
    for kind in KINDS:
        inputs, outputs = upstream[kind]
        for entry in exported[kind]["entries"]:
            index = int(entry.name.split("_")[1])
            errors = rows_against_upstream(exported[kind]["staging"] / entry.file.file, inputs[index], outputs, index)
            print(f"{kind} {entry.name} vs imagen-pytorch, rel. error per row (keep, drop, keep, drop): {errors}")
            assert max(errors) <= UPSTREAM_TOLERANCE
    assert "imagen_pytorch" not in sys.modules  # imported by the child processes only


@pytest.mark.slow
def test_fp16_unet(tiny, upstream, tmp_path):
    """ElucidatedImagen's base Unet (self-conditioned) in FP16, against its own module and imagen-pytorch's.
    (The tiny Unets' outputs are small, their final convolutions starting at zero: FP16 rounding is about
    1e-2 of them relative, for Imagen's super-resolution Unet just over it; this one measures 6e-3.)"""
    options = ExportOptions(fp16=True, max_batch=MAX_BATCH)
    result = export(tiny, "elucidated", tmp_path, options, indexes=[0])
    (entry,) = result["entries"]
    print(f"fp16 {entry.name}: parity rel. errors {entry.parity.rel_error}")
    assert entry.precision == "fp16" and entry.parity.tolerance == TOLERANCE["fp16"] and entry.parity.passed
    assert max(entry.parity.rel_error) <= TOLERANCE["fp16"]
    inputs, outputs = upstream["elucidated"]
    errors = rows_against_upstream(tmp_path / entry.file.file, inputs[0], outputs, 0)
    print(f"fp16 {entry.name} vs imagen-pytorch, rel. error per row: {errors}")
    assert max(errors) <= TOLERANCE["fp16"]


# --- failures


def test_imagen_pytorch_missing_in_the_child(tiny, tmp_path, monkeypatch):
    hidden = tmp_path / "hide" / "imagen_pytorch"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'imagen_pytorch'\", name='imagen_pytorch')\n"
    )
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(hidden.parent), os.environ.get("PYTHONPATH", "")]))
    with pytest.raises(ExportError) as raised:
        export(tiny, "imagen", tmp_path / "staging", indexes=[0])
    message = str(raised.value)
    print(message)
    assert "No module named 'imagen_pytorch'" in message
    assert "pip install --no-deps imagen-pytorch==2.1.0" in message and "imagen-cascade[imagen-pytorch]" in message
    assert "with a CUDA torch, `pip install imagen-pytorch==2.1.0`" in message
    assert not (tmp_path / "staging" / WORK).exists()


def test_failing_child_reports_its_output(tiny, tmp_path):
    with pytest.raises(ExportError, match=r"(?s)exit code 1.*TypeError.*use_emma.*export again"):
        export(tiny, "imagen", tmp_path, indexes=[0], use_emma=False)


def test_child_export_errors_come_back(tiny, tmp_path):
    said = []
    job = dict(stage=2, signature={}, input_kwargs={})
    with pytest.raises(ExportError, match="has 2 Unets; stage index 2"):
        write_imagen_pytorch_unets(tiny["imagen"], {}, [job], tmp_path, ExportOptions(), said.append)
    with pytest.raises(ExportError, match="absent.pt is not a file"):
        write_imagen_pytorch_unets(tmp_path / "absent.pt", {}, [job], tmp_path, ExportOptions(), said.append)
    assert said == [] and list(tmp_path.iterdir()) == []


def test_child_killed_when_the_parent_stops(tiny, tmp_path, monkeypatch):
    """An interrupted export (Ctrl-C in `say`) leaves no child running and no job files."""
    started = []
    real_popen = imagen_pytorch_onnx.subprocess.Popen

    def popen(*args, **kwargs):
        started.append(real_popen(*args, **kwargs))
        return started[-1]

    def say(message):
        raise KeyboardInterrupt

    monkeypatch.setattr(imagen_pytorch_onnx.subprocess, "Popen", popen)
    waits = "import sys, time; print(sys.argv[1], flush=True); time.sleep(60)"  # a progress line, then a wait
    monkeypatch.setattr(
        imagen_pytorch_onnx, "child_command", lambda job: [sys.executable, "-c", waits, "progress: one"]
    )
    with pytest.raises(KeyboardInterrupt):
        write_imagen_pytorch_unets(tiny["imagen"], {}, [], tmp_path, ExportOptions(), say)
    assert started[0].poll() is not None and list(tmp_path.iterdir()) == []


# --- the pieces in this process


class FakeUnet:
    """Stands for imagen-pytorch's Unet: its forward draws the kept rows with this module's prob_mask_like."""

    def forward(self, batch):
        return prob_mask_like((batch,), 0.5, None)


def prob_mask_like(shape, prob, device):
    return np.random.default_rng().uniform(size=shape) < prob


def test_text_kept_replaces_the_draw_and_restores_it():
    unet, keep = FakeUnet(), np.array([True, False, False])
    with text_kept(unet, keep):
        assert unet.forward(3) is keep
    with pytest.raises(ValueError), text_kept(unet, keep):
        raise ValueError
    assert globals()["prob_mask_like"] is prob_mask_like


class FakeSRUnet(nn.Module):
    lowres_cond, self_cond = True, False


def test_unet_stage_takes_the_signatures_order():
    """A super-resolution Unet without self-conditioning takes its low-res inputs sixth and seventh."""
    assert type(unet_stage(FakeSRUnet())) is ImagenPytorchSRUnetStage
    with pytest.raises(ExportError, match="unet_stage"):
        ImagenPytorchUnetStage(FakeSRUnet())
    signature = unet_signature(1, 16, MAX_TEXT_LEN, EMBED_DIM, True, MAX_BATCH, self_cond=False)
    parameters = list(inspect.signature(ImagenPytorchSRUnetStage.forward).parameters)[1:]
    assert parameters == signature.input_names


def test_t5_config_offline():
    def unreachable(name, **kwargs):
        assert kwargs["local_files_only"] is True
        raise OSError("not in the cache")

    sizes = ("small", "base", "large", "xl", "xxl")
    widths = [t5_config_offline(f"google/t5-v1_1-{size}", unreachable).d_model for size in sizes]
    assert widths == [512, 768, 1024, 2048, 4096]
    with pytest.raises(OSError):
        t5_config_offline("someone/encoder", unreachable)
    assert t5_config_offline("google/t5-v1_1-base", lambda name, **kw: "cached") == "cached"
