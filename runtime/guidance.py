"""Classifier-free guidance and dynamic thresholding (Imagen sec. 2.3), float32 NumPy."""

import numpy as np


def guide(cond: np.ndarray, uncond: np.ndarray, scale: float) -> np.ndarray:
    """uncond + scale * (cond - uncond), in float32."""
    return uncond + np.float32(scale) * (cond - uncond)


def dynamic_threshold(x0: np.ndarray, percentile: float) -> np.ndarray:
    """Per sample s = max(quantile_p(|x0|), 1) (linear interpolation); clip to [-s, s], divide by s."""
    flat = np.abs(x0.reshape(x0.shape[0], -1))
    s = np.quantile(flat, percentile, axis=-1).astype(x0.dtype, copy=False)
    s = np.maximum(s, np.asarray(1.0, dtype=x0.dtype)).reshape(-1, *((1,) * (x0.ndim - 1)))
    return np.clip(x0, -s, s) / s
