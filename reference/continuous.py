"""Sampling imagen-pytorch's Unets: the two loops that walk a stage's per-step table and the data
prediction from a Unet's output (docs/bundle.md, Continuous time). `denoise(x, row, self_cond) -> x0`
is the guided, thresholded data prediction of one Unet call at the step's scalars (`row`).

The torch twin of `imagen.runtime.continuous` (array API): same names, formulas, order of float32
operations and noise draws (docs/bundle.md, Twins). The scalars are Python floats holding float32
values, which float32 tensors take as float32 scalars. The reference for both is imagen-pytorch's
own sampling (tests/test_imagen_pytorch_bundle.py).
"""

import math
from collections.abc import Callable

import torch

Array = torch.Tensor
TableDenoise = Callable[[Array, dict, Array | None], Array]  # (x, the step's scalars, self_cond) -> x0
Noise = Callable[[tuple], Array]  # shape -> standard normal float32 draws


def sample_ddpm_continuous(
    denoise: TableDenoise, x: Array, table: dict, noise: Noise, callback: Callable | None = None
) -> Array:
    """imagen-pytorch's ancestral sampler in continuous time (Imagen.p_sample_loop): at times
    t = linspace(1, 0, T + 1) in pairs, the posterior q(x_next | x, x0) of the variational diffusion
    model (Kingma et al. 2021, eq. 33): mean alpha_next (x (1 - c) / alpha + c x0) with
    c = -expm1(logsnr_t - logsnr_next), std sigma_next sqrt(c). A draw every step, the last one
    included, where the table's std is 0. `x` is the initial standard normal image; the data
    prediction of each step conditions the next (`self_cond`, None at the first)."""
    x0 = None
    for i, (time_, alpha, sigma) in enumerate(zip(table["time"], table["alpha"], table["sigma"], strict=True)):
        x0 = denoise(x, {"time": time_, "alpha": alpha, "sigma": sigma}, x0)
        mean = table["alpha_next"][i] * (x * table["one_minus_c"][i] / alpha + table["c"][i] * x0)
        x = mean + table["noise_std"][i] * noise(tuple(x.shape))
        if callback is not None:
            callback(i, i, x)
    return x


def sample_heun_edm(
    denoise: TableDenoise, x: Array, table: dict, noise: Noise, callback: Callable | None = None
) -> Array:
    """Karras et al. 2022, alg. 2 (ElucidatedImagen.one_unet_sample): from sigma_i, churn up to
    sigma_hat = sigma_i (1 + gamma_i) with fresh noise (S_noise eps, drawn every step), an Euler step
    to sigma_next and, unless sigma_next is 0, Heun's correction with a second Unet call: 2N - 1
    calls in all. `x` is a standard normal image; the loop starts from init_sigma x. A step's first
    call is conditioned on the previous step's last data prediction, the correction on the first's."""
    x = table["init_sigma"] * x
    x0 = None
    columns = zip(table["sigma"], table["sigma_next"], table["gamma"], strict=True)
    for i, (sigma, sigma_next, gamma) in enumerate(columns):
        eps = table["S_noise"] * noise(tuple(x.shape))
        sigma_hat = sigma + gamma * sigma
        x_hat = x + math.sqrt(sigma_hat**2 - sigma**2) * eps
        first = {name: table[name][i] for name in ("time", "c_in", "c_skip", "c_out")}
        d = denoise(x_hat, first, x0)
        d_over_sigma = (x_hat - d) / sigma_hat
        x_next = x_hat + (sigma_next - sigma_hat) * d_over_sigma
        x0 = d
        if sigma_next != 0:
            second = {name: table[f"{name}_next"][i] for name in ("time", "c_in", "c_skip", "c_out")}
            d_next = denoise(x_next, second, d)
            d_next_over_sigma = (x_next - d_next) / sigma_next
            x_next = x_hat + 0.5 * (sigma_next - sigma_hat) * (d_over_sigma + d_next_over_sigma)
            x0 = d_next
        x = x_next
        if callback is not None:
            callback(i, i, x)
    return x


TABLE_SAMPLERS: dict[str, Callable] = {"ddpm_continuous": sample_ddpm_continuous, "heun_edm": sample_heun_edm}


def data_prediction(x, out, row: dict, prediction: str):
    """x0 from the Unet's (guided) output as imagen-pytorch derives it: `noise`
    (x - sigma eps) / max(alpha, 1e-8); `v` alpha x - sigma v; `x_start` the output; `edm`
    c_skip x + c_out F (EDM's preconditioning, eq. 7)."""
    if prediction == "noise":
        return (x - row["sigma"] * out) / max(row["alpha"], 1e-8)
    if prediction == "v":
        return row["alpha"] * x - row["sigma"] * out
    if prediction == "edm":
        return row["c_skip"] * x + row["c_out"] * out
    return out
