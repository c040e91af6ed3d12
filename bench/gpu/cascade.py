"""The models `python -m bench.gpu` makes on the spot (nothing is downloaded), and the reference Unet
as a stage backend of the runtime.

- `Sizes`: every size of a run; `GPU_SIZES` for a GPU, `SMOKE_SIZES` for a CPU or a quick check.
- The scaffold: a random-weight run in this project's run format (tiny BaseTest/SuperTest Unets
  at the chosen image sizes, a tiny byte-level T5) and its bundle (`export_bundle`). The bundle
  gives the runtime's `Pipeline` its schedules, defaults, tokenizer and stage signatures.
- `bench_unet`: a random-weight Unet of a MinImagen preset at any width, built on the device.
- `TorchUnetBackend` (the NumPy loop: feeds copied to the Unet's device and the prediction back,
  every call) and `DLPackUnetBackend` (the loop's arrays live where the Unet does, CuPy on a GPU,
  and cross to torch and back through DLPack without copies).
"""

import contextlib
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SCAFFOLD_UNETS = ("BaseTest", "SuperTest")
SCAFFOLD_ATTENTION = (False, True)  # as the tests' tiny run: attention at the inner level only


@dataclass
class Sizes:
    """The sizes of one run. Section 7's Unet is `unet` at `dim` and `image_size`; on a GPU the
    cascade of section 8 runs it as its first Unet and `super_unet` at `super_dim` as its second."""

    unet: str = "Base"  # a preset of imagen.reference.unet (MinImagen's Base: 4 levels, attention at 3)
    dim: int = 256
    image_size: int = 64
    super_unet: str = "Super"
    super_dim: int = 64
    super_size: int = 128
    batch: int = 8  # images per request; the Unets run 2x as many rows (cond + uncond)
    steps: int = 25  # per Unet, DPM-Solver++(2M)
    repeats: int = 3  # timed requests after one warm-up; the best is reported
    text_length: int = 32
    text_width: int = 128
    timesteps: int = 1000
    guidance_scale: float = 5.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


GPU_SIZES = Sizes()
SMOKE_SIZES = Sizes(
    unet="BaseTest",
    dim=8,
    image_size=16,
    super_unet="SuperTest",
    super_dim=8,
    super_size=32,
    batch=2,
    steps=3,
    repeats=1,
    text_length=16,
    timesteps=100,
)


def unet_config(preset: str, dim: int, index: int, text_width: int, text_length: int, **overrides):
    """The UnetConfig of preset at width `dim` as Unet `index` of a cascade (index > 0: super-resolution)."""
    from imagen.reference.imagen import cast_unet_config
    from imagen.reference.unet import preset_config

    config = preset_config(preset, dim=dim, max_text_len=text_length, **overrides)
    return cast_unet_config(config, index, text_width, 3)


def bench_unet(preset: str, dim: int, index: int, text_width: int, text_length: int, device, seed: int = 0):
    """A random-weight Unet (seeded) built on `device` in eval mode."""
    import torch

    from imagen.reference.unet import Unet

    torch.manual_seed(seed + index)
    with torch.device(device):
        return Unet(unet_config(preset, dim, index, text_width, text_length)).eval()


def unet_flops(config, image_size: int) -> int:
    """FLOPs of one Unet call at batch 1 (2 x multiply-adds), counted on the meta device (no memory)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from imagen.reference.unet import Unet

    with torch.device("meta"):
        unet = Unet(config)
        x = torch.empty(1, 3, image_size, image_size)
        kwargs = dict(
            text_embeds=torch.empty(1, config.max_text_len, config.text_embed_dim),
            text_mask=torch.ones(1, config.max_text_len, dtype=torch.bool),
            text_keep=torch.ones(1, dtype=torch.bool),
        )
        if config.lowres_cond:
            kwargs.update(lowres_cond_img=torch.empty_like(x), lowres_noise_times=torch.ones(1))
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            unet(x, torch.ones(1), **kwargs)
    return int(counter.get_total_flops())


def parameter_count(module) -> int:
    return sum(p.numel() for p in module.parameters())


# The scaffold: a run and its bundle, made once per work folder and sizes.


def _scaffold_key(sizes: Sizes) -> dict:
    """What the scaffold depends on: its sizes and a max batch of at least 8 (a later run with
    another batch or step count reuses it; the loop passes its steps explicitly)."""
    fields = ("image_size", "super_size", "text_length", "text_width", "timesteps", "guidance_scale")
    return {"max_batch": max(8, sizes.batch), **{name: getattr(sizes, name) for name in fields}}


def write_scaffold_run(folder: Path, sizes: Sizes) -> None:
    """A run directory (config.json, text_encoder/, checkpoints/) with seeded random weights."""
    import torch

    from imagen._io import atomic_write
    from imagen.reference.checkpoint import run_config, save_checkpoint
    from imagen.reference.imagen import Imagen, ImagenConfig
    from imagen.reference.text_encoder import TextEncoder
    from imagen.reference.unet import preset_config

    encoder = TextEncoder.tiny(seed=0, max_length=sizes.text_length, d_model=sizes.text_width)
    attention = dict(layer_attns=SCAFFOLD_ATTENTION, layer_cross_attns=SCAFFOLD_ATTENTION)
    unets = [preset_config(name, max_text_len=sizes.text_length, **attention) for name in SCAFFOLD_UNETS]
    cascade = ImagenConfig(
        image_sizes=(sizes.image_size, sizes.super_size),
        timesteps=sizes.timesteps,
        guidance_scale=sizes.guidance_scale,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        imagen = Imagen(unets, cascade, encoder.embed_dim)
    folder.mkdir(parents=True, exist_ok=True)
    encoder.save(folder / "text_encoder")
    atomic_write(folder / "config.json", json.dumps(run_config(imagen, encoder), indent=2))
    weights = {f"unets.{k}": v for k, v in imagen.unets.state_dict().items()}
    save_checkpoint(folder, 0, {"model": weights, "ema": weights}, {"step": 0})


def scaffold(work: Path, sizes: Sizes, say=print) -> tuple[Path, Path, bool]:
    """(run directory, bundle directory, made now) under `work`; reused when the sizes match."""
    from imagen.export.bundle import export_bundle

    run_dir, bundle_dir, key_file = work / "run", work / "bundle", work / "scaffold.json"
    key = _scaffold_key(sizes)
    if key_file.is_file() and (bundle_dir / "manifest.json").is_file():
        made = json.loads(key_file.read_text())
        if made.pop("max_batch", 0) >= sizes.batch and made == {k: v for k, v in key.items() if k != "max_batch"}:
            return run_dir, bundle_dir, False
    say(f"making the scaffold run and bundle in {work}")
    key_file.unlink(missing_ok=True)
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    write_scaffold_run(run_dir, sizes)
    export_bundle(
        run_dir, bundle_dir, max_batch=key["max_batch"], sampler="dpmpp_2m", steps=None, sr_strength=1.0, force=True
    )
    key_file.write_text(json.dumps(key))
    return run_dir, bundle_dir, True


# The reference Unet as a stage backend.


def autocast(device, precision: str):
    """torch.autocast to FP16 on a CUDA device for precision "fp16"; nothing otherwise."""
    import torch

    if precision == "fp16" and torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


class TorchUnetBackend:
    """A reference Unet as a stage backend over NumPy arrays: every call copies the feeds to the
    Unet's device and the prediction back to the host (float32 out, whatever `precision`)."""

    def __init__(self, unet, stage_signature, precision: str = "fp32"):
        self.unet, self.stage, self.precision = unet, stage_signature, precision
        self.device = next(unet.parameters()).device

    def forward(self, tensors: dict):
        """The Unet on torch tensors named as its forward's arguments; the float32 noise prediction."""
        import torch

        tensors = dict(tensors)
        x, time = tensors.pop("x"), tensors.pop("time")
        with torch.no_grad(), autocast(self.device, self.precision):
            return self.unet(x, time, **tensors).float()

    def run(self, feeds: dict) -> dict:
        import torch

        from imagen.runtime.backends import check_feeds

        check_feeds(self.stage, feeds)
        tensors = {k: torch.as_tensor(np.ascontiguousarray(v), device=self.device) for k, v in feeds.items()}
        return {"noise_pred": self.forward(tensors).cpu().numpy()}


class DLPackUnetBackend(TorchUnetBackend):
    """The same Unet over arrays of `array_namespace` (CuPy's on a GPU) on the Unet's device: they
    cross to torch and back through DLPack, without copies. A CUDA call waits for its kernels
    before it returns, so the time inside `run` is the Unet's, not the loop's next sync."""

    def __init__(self, unet, stage_signature, array_namespace, precision: str = "fp32"):
        super().__init__(unet, stage_signature, precision)
        self.array_namespace = array_namespace

    def _to_torch(self, array):
        import torch

        try:
            return torch.from_dlpack(array)
        except Exception:  # libraries raise different types for a dtype their DLPack lacks; re-raised below
            from imagen.runtime.arrays import dtype_name

            xp = self.array_namespace
            if dtype_name(array) != "bool":
                raise
            return torch.from_dlpack(xp.astype(array, xp.uint8)).bool()  # a DLPack without bool

    def run(self, feeds: dict) -> dict:
        import torch

        from imagen.runtime.backends import check_feeds

        check_feeds(self.stage, feeds)
        pred = self.forward({k: self._to_torch(v) for k, v in feeds.items()}).contiguous()
        if pred.is_cuda:
            torch.cuda.current_stream(pred.device).synchronize()
        return {"noise_pred": self.array_namespace.from_dlpack(pred)}
