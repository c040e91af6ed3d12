"""The cascade: a base Unet and super-resolution Unets over Gaussian diffusion.

Training loss per Unet (random t, L2 on the predicted noise, low-res conditioning made by
shrinking then enlarging, noise augmentation with its own schedule) and DDPM ancestral
sampling with classifier-free guidance and dynamic thresholding. Sampling draws every
random number through one `noise` source in the order of docs/bundle.md, so the NumPy
runtime can be fed the same numbers and compared step by step.
"""

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .diffusion import GaussianDiffusion
from .guidance import GuidedDenoiser
from .images import resize_image
from .samplers import run_sampler, spaced_timesteps
from .unet import Unet, UnetConfig


@dataclass
class ImagenConfig:
    """Cascade settings; the sampling defaults are written into the exported bundle."""

    image_sizes: tuple = (32, 64)
    timesteps: int | tuple = 1000
    schedule: str = "linear"
    lowres_timesteps: int | None = None  # the augmentation schedule; defaults to the base Unet's T
    channels: int = 3
    cond_drop_prob: float = 0.1
    lowres_sample_noise_level: float = 0.2
    dynamic_thresholding_percentile: float = 0.9
    guidance_scale: float = 5.0

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "ImagenConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown Imagen parameters {sorted(unknown)}; known: {sorted(names)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def timesteps_per_unet(self) -> tuple[int, ...]:
        if isinstance(self.timesteps, (list, tuple)):
            if len(self.timesteps) != len(self.image_sizes):
                raise ValueError(f"timesteps has {len(self.timesteps)} entries for {len(self.image_sizes)} Unets")
            return tuple(self.timesteps)
        return (self.timesteps,) * len(self.image_sizes)


NoiseSource = Callable[[tuple], torch.Tensor]


def make_noise_source(noise=None) -> NoiseSource:
    """A callable shape -> float32 tensor from None (torch's RNG), a NumPy Generator,
    a callable returning arrays, or an iterable of arrays (used in order)."""
    if noise is None:
        return lambda shape: torch.randn(shape)
    if isinstance(noise, np.random.Generator):
        return lambda shape: torch.from_numpy(noise.standard_normal(shape, dtype=np.float32))
    if callable(noise):
        return lambda shape: torch.as_tensor(np.asarray(noise(shape), dtype=np.float32))
    if isinstance(noise, Iterable):
        arrays = iter(noise)

        def next_array(shape):
            array = np.asarray(next(arrays), dtype=np.float32)
            if array.shape != tuple(shape):
                raise ValueError(f"injected noise has shape {array.shape}, the sampler needs {tuple(shape)}")
            return torch.from_numpy(array)

        return next_array
    raise TypeError(f"noise must be None, a numpy Generator, a callable or arrays, not {type(noise).__name__}")


def cast_unet_config(config: UnetConfig, index: int, text_embed_dim: int, channels: int) -> UnetConfig:
    """The first Unet generates, the others super-resolve (MinImagen's _cast_model_parameters)."""
    return dataclasses.replace(
        config, lowres_cond=index > 0, text_embed_dim=text_embed_dim, channels=channels, channels_out=channels
    )


class Imagen(nn.Module):
    def __init__(self, unet_configs: list[UnetConfig], config: ImagenConfig, text_embed_dim: int):
        super().__init__()
        if len(unet_configs) != len(config.image_sizes):
            raise ValueError(
                f"{len(unet_configs)} Unets but {len(config.image_sizes)} image sizes; give one image size per Unet"
            )
        if list(config.image_sizes) != sorted(set(config.image_sizes)):
            raise ValueError(f"image_sizes must increase from stage to stage, got {list(config.image_sizes)}")
        self.config = config
        self.text_embed_dim = text_embed_dim
        self.image_sizes = tuple(config.image_sizes)
        self.unets = nn.ModuleList(
            Unet(cast_unet_config(c, i, text_embed_dim, config.channels)) for i, c in enumerate(unet_configs)
        )
        self.noise_schedulers = nn.ModuleList(
            GaussianDiffusion(timesteps=t, schedule=config.schedule) for t in config.timesteps_per_unet()
        )
        lowres_timesteps = config.lowres_timesteps or config.timesteps_per_unet()[0]
        self.lowres_noise_schedule = GaussianDiffusion(timesteps=lowres_timesteps, schedule=config.schedule)

    # Training

    def loss(
        self,
        images: torch.Tensor,
        text_embeds: torch.Tensor,
        text_mask: torch.Tensor,
        unet_index: int,
        generator: torch.Generator | None = None,
        lowres_max_noise_level: float = 1.0,
    ) -> torch.Tensor:
        """L2 loss on the noise predicted by Unet `unet_index` for images (b, c, h, w) in [0, 1].

        Super-resolution Unets see their low-res image noised to a time drawn uniformly below
        `lowres_max_noise_level * T` (1.0, all of them, as MinImagen)."""
        unet = self.unets[unet_index]
        schedule = self.noise_schedulers[unet_index]
        size = self.image_sizes[unet_index]
        batch, device = images.shape[0], images.device

        def randn(shape):
            return torch.randn(shape, generator=generator, device=device)

        times = schedule.sample_random_times(batch, generator=generator, device=device)
        lowres_cond_img = lowres_noise_times = None
        if unet_index > 0:
            low = resize_image(images, self.image_sizes[unet_index - 1], clamp_range=(0.0, 1.0))
            low = resize_image(low, size, clamp_range=(0.0, 1.0)) * 2 - 1
            # One augmentation level per batch, as MinImagen; normalised before noising.
            aug = self.lowres_noise_schedule.sample_random_times(
                1, generator=generator, device=device, max_level=lowres_max_noise_level
            )
            lowres_noise_times = aug.expand(batch)
            lowres_cond_img = self.lowres_noise_schedule.q_sample(low, lowres_noise_times, randn(low.shape))
            lowres_noise_times = lowres_noise_times.float()
        x_start = resize_image(images, size) * 2 - 1
        noise = randn(x_start.shape)
        x_noisy = schedule.q_sample(x_start, times, noise)
        text_keep = torch.rand(batch, generator=generator, device=device) >= self.config.cond_drop_prob
        pred = unet(
            x_noisy,
            times.float(),
            text_embeds=text_embeds,
            text_mask=text_mask,
            text_keep=text_keep,
            lowres_cond_img=lowres_cond_img,
            lowres_noise_times=lowres_noise_times,
        )
        return F.mse_loss(pred, noise)

    # Sampling

    @torch.no_grad()
    def sample(
        self,
        text_embeds: torch.Tensor,
        text_mask: torch.Tensor,
        *,
        guidance_scale: float | None = None,
        lowres_sample_noise_level: float | None = None,
        sampler: str = "ddpm",
        steps: int | tuple | None = None,
        eta: float = 0.0,
        sr_strength: float = 1.0,
        noise=None,
        stop_at_unet: int | None = None,
        callback: Callable | None = None,
    ) -> torch.Tensor:
        """Images (b, c, s, s) in [0, 1] for text_embeds (b, n, d), text_mask (b, n).

        `sampler`: ddpm (ancestral; all trained timesteps by default), ddim or dpmpp_2m;
        `steps`: per Unet (an int for all, or a tuple), None for all timesteps.
        `sr_strength`: super-resolution Unets start from their upsampled input noised to the
        timestep that leaves round(steps * sr_strength) steps (1.0: from pure noise, as Imagen).
        `noise`: None, a NumPy Generator or arrays (make_noise_source), drawn in the order of
        docs/bundle.md. `callback(unet_index, step, t, x)` sees x after every step.
        """
        guidance_scale = self.config.guidance_scale if guidance_scale is None else guidance_scale
        level = (
            self.config.lowres_sample_noise_level if lowres_sample_noise_level is None else lowres_sample_noise_level
        )
        draw = make_noise_source(noise)
        batch = text_embeds.shape[0]
        steps_per_unet = steps if isinstance(steps, (list, tuple)) else (steps,) * len(self.unets)
        x = None
        unets = list(zip(self.unets, self.noise_schedulers, self.image_sizes))[:stop_at_unet]
        for index, (unet, schedule, size) in enumerate(unets):
            unet.eval()
            lowres = {}
            if index > 0:
                upsampled = resize_image(x, size)
                t_aug = self.lowres_noise_schedule.noise_level_timestep(level)
                lowres_cond_img = self.lowres_noise_schedule.q_sample(upsampled, t_aug, draw(tuple(upsampled.shape)))
                lowres = {"lowres_cond_img": lowres_cond_img, "lowres_noise_times": torch.full((batch,), float(t_aug))}
            denoise = GuidedDenoiser(
                unet,
                schedule,
                text_embeds,
                text_mask,
                guidance_scale=guidance_scale,
                percentile=self.config.dynamic_thresholding_percentile,
                **lowres,
            )
            strength = sr_strength if index > 0 else 1.0
            timesteps = spaced_timesteps(
                schedule.num_timesteps, steps_per_unet[index] or schedule.num_timesteps, strength
            )
            step_callback = None if callback is None else (lambda i, t, x, index=index: callback(index, i, t, x))
            x = draw((batch, self.config.channels, size, size))
            if strength < 1:
                x = schedule.q_sample(upsampled, timesteps[0], x)
            x = run_sampler(sampler, denoise, x, schedule.alphas_cumprod.numpy(), timesteps, draw, eta, step_callback)
            x = x.clamp(-1.0, 1.0)
        return (x + 1) / 2
