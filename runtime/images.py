"""Images between and after the cascade stages (docs/bundle.md, Resizing between stages).

`resize_image` enlarges: bilinear, half-pixel centres, edge clamp, no antialiasing (PyTorch's
interpolate(mode="bilinear", align_corners=False)), separable. `to_uint8` quantizes the final
images. The NumPy twin of `imagen.reference.images` (torch), which also shrinks (training only).
"""

import numpy as np


def _axis_weights(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices i0, i1 and the weight on i1 for each output index along one axis."""
    scale = np.float32(n_in / n_out)
    i = np.arange(n_out, dtype=np.float32)
    c = np.maximum((i + np.float32(0.5)) * scale - np.float32(0.5), np.float32(0.0))
    i0 = np.floor(c).astype(np.int64)
    i0 = np.minimum(i0, n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = (c - i0.astype(np.float32)).astype(np.float32)
    return i0, i1, w1


def resize_image(x: np.ndarray, size: int) -> np.ndarray:
    """Enlarges (b, c, h, w) float32 images to (b, c, size, size); same size is returned as is."""
    h, w = x.shape[-2:]
    if h == size and w == size:
        return x
    if size < h or size < w:
        raise ValueError(f"the runtime only enlarges images ({h}x{w} -> {size}x{size})")
    i0, i1, wy = _axis_weights(h, size)
    rows = x[..., i0, :] * (np.float32(1) - wy)[:, None] + x[..., i1, :] * wy[:, None]
    j0, j1, wx = _axis_weights(w, size)
    out = rows[..., j0] * (np.float32(1) - wx) + rows[..., j1] * wx
    return out.astype(x.dtype, copy=False)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """(b, c, h, w) images in [0, 1] -> uint8 (b, h, w, c): floor(clip(images, 0, 1) * 255 + 0.5),
    in the images' float dtype (float32 for the cascade's output)."""
    quantized = np.floor(np.clip(images, 0, 1) * np.float32(255) + np.float32(0.5))
    return quantized.astype(np.uint8).transpose(0, 2, 3, 1)
