"""imagen-pytorch cascades at tiny width, made offline by imagen-pytorch itself: an `Imagen` (two Unets,
continuous times, self-conditioning, noise then v objective) and an `ElucidatedImagen`, each built from
its `ImagenConfig`/`ElucidatedImagenConfig`, trained two steps per Unet by `ImagenTrainer` and
written by `ImagenTrainer.save`, as users' checkpoints are.

The cascades are made in a child Python process (`write_tiny_imagen_pytorch`), which keeps the test
process free of what imagen-pytorch needs offline:
- it reads the T5 config `google/t5-v1_1-base` from the hub when imported (default arguments of
  `Unet.__init__` and `UnetConfig` call `t5.get_encoded_dim`): the child points HF_HUB_CACHE at a cache
  laid out here holding only that config (T5 v1.1 base's widths) and sets HF_HUB_OFFLINE=1; the
  cascades pass `text_embed_dim`, so no T5 weights are ever read;
- it imports `torchvision.transforms` for `ToPILImage`, used only by `sample(return_pil_images=True)`;
  torchvision's PyPI build needs a CUDA torch, so beside the CPU torch the child puts a stand-in
  module in its place, once transformers, datasets, accelerate and kornia have found it absent.

(The import itself is the exporter's, `imagen.export.imagen_pytorch_onnx.import_imagen_pytorch`.)

The child then loads each file with imagen-pytorch's own `load_imagen_from_checkpoint` and writes what
that makes of it to OUT/upstream_facts.json (`upstream_facts`), for the tests to hold this project's
reader against. Run as a script, `python tests/imagen_pytorch_tiny.py OUT` writes OUT/imagen.pt,
OUT/elucidated.pt and OUT/upstream_facts.json.

A second child mode runs imagen-pytorch's own Unets on given inputs (`run_upstream_unets`): `python
tests/imagen_pytorch_tiny.py --unet-outputs CHECKPOINT INPUTS.npz OUTPUTS.npz [...]`, for the tests to
hold the exported ONNX files against.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from imagen.export.imagen_pytorch_onnx import import_imagen_pytorch

IMAGE_SIZES = (8, 16)
EMBED_DIM = 32  # the text embeddings' width (a T5's d_model); the Unets' text_embed_dim
TEXT_LENGTH = 8  # tokens in the training batch's text embeddings
MAX_TEXT_LEN = 16  # the Unets' max_text_len
TRAIN_STEPS = 2  # per Unet: the second step makes the EMA weights differ from the trained ones
SEED = 0
T5_NAME = "google/t5-v1_1-base"  # imagen-pytorch's DEFAULT_T5_NAME
T5_CONFIG = dict(
    model_type="t5",
    d_model=768,
    d_ff=2048,
    d_kv=64,
    num_heads=12,
    num_layers=12,
    vocab_size=32128,
    feed_forward_proj="gated-gelu",
    tie_word_embeddings=False,
)
UNET = dict(
    dim=16,
    dim_mults=(1, 2),
    num_resnet_blocks=1,
    layer_attns=(False, True),
    layer_cross_attns=(False, True),
    attn_heads=2,
    attn_dim_head=8,
    max_text_len=MAX_TEXT_LEN,
    self_cond=True,
)
IMAGEN = dict(
    unets=[UNET, {**UNET, "memory_efficient": True}],
    image_sizes=IMAGE_SIZES,
    text_embed_dim=EMBED_DIM,
    timesteps=(20, 10),
    noise_schedules=("cosine", "linear"),
    pred_objectives=("noise", "v"),
    cond_drop_prob=0.1,
    lowres_sample_noise_level=0.25,
    dynamic_thresholding=(True, False),
)
ELUCIDATED = dict(
    unets=[UNET, {**UNET, "self_cond": False}],
    image_sizes=IMAGE_SIZES,
    text_embed_dim=EMBED_DIM,
    cond_drop_prob=0.1,
    num_sample_steps=(6, 4),
    sigma_min=0.002,
    sigma_max=(80, 40),
    S_churn=(40, 0),
)
EMA = dict(ema_beta=0.9, ema_update_after_step=0, ema_update_every=1)
# imagen-pytorch and what it imports when imported (torchvision aside: see above)
REQUIRED = ("imagen_pytorch", "einops", "ema_pytorch", "kornia", "accelerate", "datasets", "beartype", "pytorch_warmup")


def missing_packages() -> list[str]:
    """The packages the child needs that are not installed (`pip install imagen-pytorch==2.1.0`, see
    the tests' module docstring for a CPU torch)."""
    import importlib.util

    return [name for name in REQUIRED if importlib.util.find_spec(name) is None]


def write_t5_config_cache(hub_cache: Path) -> None:
    """A hub cache holding only `google/t5-v1_1-base/config.json`, as huggingface_hub lays out a download."""
    commit = "0" * 40
    repo = hub_cache / ("models--" + T5_NAME.replace("/", "--"))
    (repo / "snapshots" / commit).mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit / "config.json").write_text(json.dumps(T5_CONFIG))


def offline_environment(hub_cache: Path) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub_cache), "TRANSFORMERS_VERBOSITY": "error"}


def _train_and_save(imagen_pytorch, config, out: Path) -> None:
    """Trains each Unet in turn as the trainer allows (one Unet a trainer: save, then resume in a new
    one), then saves."""
    import torch

    images = torch.rand(2, 3, IMAGE_SIZES[-1], IMAGE_SIZES[-1])
    text_embeds = torch.randn(2, TEXT_LENGTH, EMBED_DIM)
    text_masks = torch.arange(TEXT_LENGTH) < torch.tensor([[TEXT_LENGTH], [TEXT_LENGTH // 2]])
    text_embeds = text_embeds * text_masks[..., None]  # padding embeds zero, as imagen-pytorch's T5 encoding gives
    for unet_number in range(1, len(IMAGE_SIZES) + 1):
        trainer = imagen_pytorch.ImagenTrainer(config.create(), lr=1e-3, verbose=False, **EMA)
        if unet_number > 1:
            trainer.load(str(out))
        for _ in range(TRAIN_STEPS):
            trainer(images, text_embeds=text_embeds, text_masks=text_masks, unet_number=unet_number)
            trainer.update(unet_number=unet_number)
        trainer.save(str(out))


def build(out: Path) -> None:
    """In the child: both cascades, trained and saved under `out`. Seeded, Python's `random` too (the
    trainer draws whether to self-condition from it)."""
    import random

    import torch

    imagen_pytorch = import_imagen_pytorch()
    configs = {
        "imagen.pt": imagen_pytorch.ImagenConfig(**IMAGEN),
        "elucidated.pt": imagen_pytorch.ElucidatedImagenConfig(**ELUCIDATED),
    }
    for name, config in configs.items():
        random.seed(SEED)
        torch.manual_seed(SEED)
        _train_and_save(imagen_pytorch, config, out / name)


def _unet_inputs(unet, image_size: int) -> dict:
    import torch

    generator = torch.Generator().manual_seed(SEED)
    randn = lambda *shape: torch.randn(*shape, generator=generator)
    inputs = dict(x=randn(2, 3, image_size, image_size), time=randn(2), text_embeds=randn(2, TEXT_LENGTH, EMBED_DIM))
    inputs["text_mask"] = torch.tensor([[True] * TEXT_LENGTH, [True] * 3 + [False] * (TEXT_LENGTH - 3)])
    if unet.self_cond:
        inputs["self_cond"] = randn(2, 3, image_size, image_size)
    if unet.lowres_cond:
        inputs.update(lowres_cond_img=randn(2, 3, image_size, image_size), lowres_noise_times=randn(2))
    return inputs


def upstream_facts(path: Path) -> dict:
    """In the child: what imagen-pytorch's own loader (`load_imagen_from_checkpoint`, EMA weights) makes
    of the file, beside this project's reading of it: each Unet rebuilt from the reader's parameters and
    weights (strict), and the largest difference of its output from imagen-pytorch's Unet."""
    import torch

    from imagen.export.imagen_pytorch import read_imagen_pytorch

    imagen_pytorch = import_imagen_pytorch()
    imagen = imagen_pytorch.load_imagen_from_checkpoint(str(path), load_ema_if_available=True).eval()
    checkpoint = read_imagen_pytorch(path)
    facts = dict(
        image_sizes=list(imagen.image_sizes),
        text_embed_dim=imagen.text_embed_dim,
        cond_drop_prob=imagen.cond_drop_prob,
        dynamic_thresholding=list(imagen.dynamic_thresholding),
        dynamic_thresholding_percentile=imagen.dynamic_thresholding_percentile,
        lowres_sample_noise_level=imagen.lowres_sample_noise_level,
        lowres_noise_schedule=imagen.lowres_noise_schedule.log_snr.name,
        unets=[],
    )
    if isinstance(imagen, imagen_pytorch.ElucidatedImagen):
        facts["hparams"] = [hparams._asdict() for hparams in imagen.hparams]
    else:
        facts["noise_schedules"] = [scheduler.log_snr.name for scheduler in imagen.noise_schedulers]
        facts["timesteps"] = [scheduler.num_timesteps for scheduler in imagen.noise_schedulers]
        facts["pred_objectives"] = list(imagen.pred_objectives)
    for unet, stage in zip(imagen.unets, checkpoint.stages):
        rebuilt = imagen_pytorch.Unet(**stage.unet_params).eval()
        rebuilt.load_state_dict(stage.state_dict, strict=True)
        inputs = _unet_inputs(unet, stage.image_size)
        with torch.no_grad():
            expected = unet(**inputs)
            difference = (rebuilt(**inputs) - expected).abs().max().item()
        local_args = {name: unet._locals[name] for name in stage.unet_params}
        scale = expected.abs().max().item()
        facts["unets"].append(dict(locals=local_args, max_abs_difference=difference, output_scale=scale))
    return facts


def signature_defaults() -> dict:
    """In the child: the defaults of imagen-pytorch's constructors and config classes."""
    import inspect

    imagen_pytorch = import_imagen_pytorch()
    defaults = {}
    for cls in (imagen_pytorch.Unet, imagen_pytorch.Imagen, imagen_pytorch.ElucidatedImagen):
        parameters = inspect.signature(cls.__init__).parameters.values()
        defaults[cls.__name__] = {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}
    for cls in (imagen_pytorch.UnetConfig, imagen_pytorch.ImagenConfig, imagen_pytorch.ElucidatedImagenConfig):
        defaults[cls.__name__] = {
            name: field.default for name, field in cls.model_fields.items() if not field.is_required()
        }
    return defaults


def build_and_describe(out: Path) -> None:
    build(out)
    facts = {name: upstream_facts(out / name) for name in ("imagen.pt", "elucidated.pt")}
    facts["defaults"] = signature_defaults()
    (out / "upstream_facts.json").write_text(json.dumps(facts, indent=1))


def write_tiny_imagen_pytorch(root: str | Path, timeout: float = 300) -> tuple[Path, Path, Path]:
    """Writes `root/imagen.pt`, `root/elucidated.pt` and `root/upstream_facts.json` in a child process;
    returns the three paths. Raises RuntimeError with the child's output when it fails."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    write_t5_config_cache(root / "hub")
    done = subprocess.run(
        [sys.executable, __file__, str(root)],
        env=offline_environment(root / "hub"),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if done.returncode != 0:
        raise RuntimeError(f"building the imagen-pytorch cascades failed:\n{done.stdout}\n{done.stderr}")
    return root / "imagen.pt", root / "elucidated.pt", root / "upstream_facts.json"


def upstream_unet_outputs(checkpoint: Path, inputs_path: Path, out: Path) -> None:
    """In the child: imagen-pytorch's own Unets (`load_imagen_from_checkpoint`, EMA weights) on the inputs in
    `inputs_path` (`{i}.{name}` for Unet i, named as `Unet.forward` names them; `text_keep` is ignored), every
    row with its text kept (`cond_drop_prob=0`) and dropped (`cond_drop_prob=1`): `{i}.keep`, `{i}.drop` in
    `out`. Unets without inputs are left out."""
    import torch

    imagen_pytorch = import_imagen_pytorch()
    imagen = imagen_pytorch.load_imagen_from_checkpoint(str(checkpoint), load_ema_if_available=True).eval()
    with np.load(inputs_path) as npz:
        arrays = dict(npz)
    outputs = {}
    for index, unet in enumerate(imagen.unets):
        feed = {key.split(".", 1)[1]: torch.from_numpy(v) for key, v in arrays.items() if key.startswith(f"{index}.")}
        feed.pop("text_keep", None)
        for label, cond_drop_prob in (("keep", 0.0), ("drop", 1.0)):
            if feed:
                with torch.no_grad():
                    outputs[f"{index}.{label}"] = unet(**feed, cond_drop_prob=cond_drop_prob).numpy()
    np.savez(out, **outputs)


def run_upstream_unets(root: str | Path, runs: dict[Path, dict], timeout: float = 300) -> dict[Path, dict]:
    """imagen-pytorch's Unet outputs (see `upstream_unet_outputs`) for each checkpoint of `runs` on its inputs
    (`{i}.{name}` -> array), in one child process; returns checkpoint -> `{i}.keep`/`{i}.drop` -> array."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    write_t5_config_cache(root / "hub")
    command, files = [sys.executable, __file__, "--unet-outputs"], {}
    for number, (checkpoint, inputs) in enumerate(runs.items()):
        files[checkpoint] = (root / f"inputs_{number}.npz", root / f"outputs_{number}.npz")
        np.savez(files[checkpoint][0], **inputs)
        command += [str(checkpoint), *map(str, files[checkpoint])]
    done = subprocess.run(
        command, env=offline_environment(root / "hub"), capture_output=True, text=True, timeout=timeout
    )
    if done.returncode != 0:
        raise RuntimeError(f"running imagen-pytorch's Unets failed:\n{done.stdout}\n{done.stderr}")
    results = {}
    for checkpoint, (_, outputs) in files.items():
        with np.load(outputs) as npz:
            results[checkpoint] = dict(npz)
    return results


if __name__ == "__main__":
    if sys.argv[1] == "--unet-outputs":
        arguments = sys.argv[2:]
        for start in range(0, len(arguments), 3):
            upstream_unet_outputs(*map(Path, arguments[start : start + 3]))
    else:
        build_and_describe(Path(sys.argv[1]))
