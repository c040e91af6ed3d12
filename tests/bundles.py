"""A hand-made bundle and fake backends: bundle verification and the pipeline's own logic tested
without real models. The stage files hold arbitrary bytes, the manifest is valid; a FakeBackend
checks its feeds like a real backend and returns a fixed function of its inputs. Also a one-node
ONNX model with its weights in external data, for the checks of where those may be."""

import hashlib
import json
from pathlib import Path

import numpy as np

from imagen.runtime import Pipeline, load_bundle
from imagen.runtime.backends import check_feeds
from imagen.runtime.contract import text_encoder_signature, unet_signature

SIZES, LENGTH, WIDTH, T = (8, 16), 8, 4, 30


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


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
            "sha256": sha(data),
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


def with_engines(root: Path, capability="9.0", version="10.3.0") -> Path:
    """The bundle plus a TensorRT section whose engines were 'built' for capability/version."""
    folder = root / "tensorrt" / f"sm{capability.replace('.', '')}-{version}"
    folder.mkdir(parents=True)
    engines = {}
    for name in ("text_encoder", "unet_0", "unet_1"):
        data = f"not really a plan: {name}".encode()
        (folder / f"{name}.plan").write_bytes(data)
        engines[name] = {
            "file": f"{folder.relative_to(root).as_posix()}/{name}.plan",
            "bytes": len(data),
            "sha256": sha(data),
        }
    trt = {
        "dir": folder.relative_to(root).as_posix(),
        "compute_capability": capability,
        "version": version,
        "engines": engines,
    }
    edit_manifest(root, lambda m: m.update(tensorrt=trt))
    return root


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
        pred = np.float32(0.2) * x + np.float32(0.05) * keep + feeds["time"][:, None, None, None] * np.float32(1e-3)
        if "lowres_cond_img" in feeds:
            pred = pred + np.float32(0.1) * feeds["lowres_cond_img"]
        if self.nan_at_call is not None and self.calls - 1 == self.nan_at_call:
            pred = pred.copy()
            pred[0, 0, 0, 0] = np.nan
        return {"noise_pred": pred.astype(np.float32)}


def fake_pipeline(root: Path) -> Pipeline:
    bundle = load_bundle(root)
    return Pipeline(bundle, {name: FakeBackend(stage.signature) for name, stage in bundle.stages.items()})


# Requests the pipeline must refuse with a ParameterError naming `parameter`: (parameter, keyword arguments).
# Also read by the `python -O` run, which imports this module in a subprocess.
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


def external_data_model(folder: Path, location: str) -> Path:
    """folder/m.onnx: y = x + w (4 float32) with w in external data that the model says is at
    `location` (written as folder/w.bin, then the location rewritten)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder.mkdir(parents=True, exist_ok=True)
    weights = numpy_helper.from_array(np.ones((4,), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        [weights],
    )
    path = folder / "m.onnx"
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(model, path, save_as_external_data=True, location="w.bin", size_threshold=0)
    model = onnx.load(path, load_external_data=False)
    for entry in model.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = location
    onnx.save(model, path)
    return path
