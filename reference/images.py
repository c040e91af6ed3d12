"""Images between and after the cascade stages (docs/bundle.md, Resizing between stages).

`resize_image` is one named algorithm, reproduced exactly by the runtime: enlarging is bilinear
with half-pixel centres (or corner to corner) and edge clamp, no antialiasing
(`interpolate(mode="bilinear", align_corners=False or True)`); shrinking is a box average
(`mode="area"`, training only). `to_uint8` quantizes the final images. The torch twin of
`imagen.runtime.images` (NumPy).
"""

import torch
import torch.nn.functional as F


def resize_image(
    x: torch.Tensor, size: int, clamp_range: tuple[float, float] | None = None, align_corners: bool = False
) -> torch.Tensor:
    """Resizes (b, c, h, w) images to (b, c, size, size), then clamps to `clamp_range` when given.
    `align_corners` enlarges corner to corner (DeepFloyd IF's upscale between its stages)."""
    if x.shape[-1] == size and x.shape[-2] == size:
        out = x
    elif size > x.shape[-1]:
        out = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=align_corners, antialias=False)
    else:
        out = F.interpolate(x, size=(size, size), mode="area")
    if clamp_range is not None:
        out = out.clamp(*clamp_range)
    return out


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(b, c, h, w) images in [0, 1] -> uint8 (b, h, w, c): floor(clip(images, 0, 1) * 255 + 0.5),
    in the images' float dtype (float32 for the cascade's output)."""
    quantized = torch.floor(images.clamp(0, 1) * 255 + 0.5)
    return quantized.to(torch.uint8).permute(0, 2, 3, 1)


def resize_nearest(x: torch.Tensor, size: int) -> torch.Tensor:
    """Enlarges (b, c, h, w) images in [-1, 1] as imagen-pytorch passes a stage's image to the next:
    to [0, 1] ((x + 1) 0.5), nearest neighbour (interpolate(mode="nearest")), back to [-1, 1]."""
    return F.interpolate((x + 1.0) * 0.5, size, mode="nearest") * 2.0 - 1.0
