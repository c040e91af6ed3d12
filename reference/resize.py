"""Resizing between cascade stages: one named algorithm, reproduced exactly by the runtime.

Enlarging is bilinear with half-pixel centres and edge clamp, no antialiasing
(`interpolate(mode="bilinear", align_corners=False)`); shrinking is a box average
(`mode="area"`). See docs/bundle.md.
"""

import torch
import torch.nn.functional as F


def resize_image(x: torch.Tensor, size: int, clamp_range: tuple[float, float] | None = None) -> torch.Tensor:
    """Resizes (b, c, h, w) images to (b, c, size, size)."""
    if x.shape[-1] == size and x.shape[-2] == size:
        out = x
    elif size > x.shape[-1]:
        out = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    else:
        out = F.interpolate(x, size=(size, size), mode="area")
    if clamp_range is not None:
        out = out.clamp(*clamp_range)
    return out
