"""Classifier-free guidance and dynamic thresholding, the two pieces of math between the
Unet and the sampler update."""

import torch


def apply_guidance(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans, 2022): uncond + s * (cond - uncond)."""
    return uncond + scale * (cond - uncond)


def dynamic_threshold(x_start: torch.Tensor, percentile: float) -> torch.Tensor:
    """Imagen sec. 2.3: s = max(quantile_p(|x0|), 1) per sample; clip to [-s, s] and divide by s."""
    s = torch.quantile(x_start.reshape(x_start.shape[0], -1).abs(), percentile, dim=-1)
    s = s.clamp(min=1.0).reshape(-1, *((1,) * (x_start.ndim - 1)))
    return x_start.clamp(-s, s) / s
