"""Images between and after the cascade stages (docs/bundle.md, Resizing between stages).

`resize_image` enlarges: bilinear, half-pixel centres (or corner to corner), edge clamp, no
antialiasing (PyTorch's interpolate(mode="bilinear", align_corners=False or True)), separable.
`to_uint8` quantizes the final images. The array-API twin of `imagen.reference.images` (torch),
which also shrinks (training only). Images may be arrays of any array API namespace; the
interpolation weights and indices are computed with NumPy on the host (they depend on the sizes
only) and moved next to the images.
"""

import numpy as np

from .arrays import namespace, to_namespace


def _axis_weights(n_in: int, n_out: int, align_corners: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices i0, i1 and the weight on i1 for each output index along one axis, in float32 as
    PyTorch's bilinear kernel takes them: half-pixel centres c = (i + 0.5) n_in / n_out - 0.5 (at
    least 0), or with `align_corners` c = i (n_in - 1) / (n_out - 1)."""
    i = np.arange(n_out, dtype=np.float32)
    if align_corners:
        c = i * np.float32((n_in - 1) / (n_out - 1) if n_out > 1 else 0.0)
    else:
        c = np.maximum((i + np.float32(0.5)) * np.float32(n_in / n_out) - np.float32(0.5), np.float32(0.0))
    i0 = np.floor(c).astype(np.int64)
    i0 = np.minimum(i0, n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = (c - i0.astype(np.float32)).astype(np.float32)
    return i0, i1, w1


def _interpolate(x, axis: int, size: int, align_corners: bool = False):
    """x enlarged to `size` along `axis` (-2: rows, -1: columns): x[i0] (1 - w1) + x[i1] w1."""
    xp = namespace(x)
    i0, i1, w1 = _axis_weights(x.shape[axis], size, align_corners)
    shape = (-1, 1) if axis == -2 else (-1,)
    w0, w1 = (xp.reshape(to_namespace(xp, w, like=x), shape) for w in (np.float32(1) - w1, w1))
    i0, i1 = (to_namespace(xp, i, like=x) for i in (i0, i1))
    return xp.take(x, i0, axis=axis) * w0 + xp.take(x, i1, axis=axis) * w1


def resize_image(x, size: int, align_corners: bool = False):
    """Enlarges (b, c, h, w) float32 images to (b, c, size, size); same size is returned as is.
    `align_corners`: corner pixels to corner pixels (DeepFloyd IF's upscale between its stages)."""
    h, w = x.shape[-2:]
    if h == size and w == size:
        return x
    if size < h or size < w:
        raise ValueError(f"the runtime only enlarges images ({h}x{w} -> {size}x{size})")
    out = _interpolate(_interpolate(x, -2, size, align_corners), -1, size, align_corners)
    return out if out.dtype == x.dtype else namespace(x).astype(out, x.dtype)


def resize_nearest(x, size: int):
    """Enlarges (b, c, h, w) images in [-1, 1] as imagen-pytorch passes a stage's image to the next:
    to [0, 1] ((x + 1) 0.5), nearest neighbour (PyTorch's interpolate(mode="nearest"): source index
    floor(i in / out)), back to [-1, 1] (2 x - 1), in float32 as its torch does."""
    xp = namespace(x)
    image = (x + 1.0) * 0.5
    for axis in (-2, -1):
        n_in = image.shape[axis]
        index = np.minimum(np.floor(np.arange(size, dtype=np.float32) * np.float32(n_in / size)), n_in - 1)
        image = xp.take(image, to_namespace(xp, index.astype(np.int64), like=x), axis=axis)
    return image * 2.0 - 1.0


def to_uint8(images):
    """(b, c, h, w) images in [0, 1] -> uint8 (b, h, w, c): floor(clip(images, 0, 1) * 255 + 0.5),
    in the images' float dtype (float32 for the cascade's output), in the images' namespace."""
    xp = namespace(images)
    quantized = xp.floor(xp.clip(images, 0.0, 1.0) * 255.0 + 0.5)
    return xp.permute_dims(xp.astype(quantized, xp.uint8), (0, 2, 3, 1))
