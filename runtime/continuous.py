"""Sampling imagen-pytorch's Unets: the two loops that walk a stage's per-step table, and the
denoiser that turns a Unet call into their data prediction (docs/bundle.md, Continuous time).

A stage sampled in `continuous` time (imagen-pytorch's `Imagen`, GaussianDiffusionContinuousTimes)
takes `ddpm_continuous`; one with `karras` sigmas (`ElucidatedImagen`) takes `heun_edm`. The table
holds, per step, every float32 scalar the loop multiplies by, as imagen-pytorch's torch computed
them at export: the loops here only add, multiply and divide float32 arrays by those scalars, in
imagen-pytorch's order, so a step lands where imagen-pytorch's lands up to the Unet engine's own
rounding. Each draws its noise from `noise(shape)` where imagen-pytorch draws it (`torch.randn`),
so a seed's draws are the ones imagen-pytorch's `sample()` takes when fed them.

The array-API twin of `imagen.reference.continuous` (torch): same names, formulas, order of
float32 operations and noise draws (docs/bundle.md, Twins). Arrays may be of any array API
namespace (NumPy, CuPy, ...); the scalars are Python floats holding float32 values, which arrays
of any namespace take as float32 scalars.
"""

import math
import time
from collections.abc import Callable

from .arrays import device, namespace
from .errors import NonFiniteError
from .guidance import _repeat_rows, apply_guidance, lowres_rows, null_text_rows, remove_parallel_guidance, threshold
from .images import resize_image, resize_nearest

Array = object  # an array of any array API namespace
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


class TableDenoiser:
    """`denoise(x, row, self_cond) -> x0` for one imagen-pytorch Unet: one call on the guidance rows
    ([cond; uncond], the learned null text swapped in by `text_keep`), fed `row["time"]` (the
    log-SNR, or EDM's c_noise) and `row["c_in"] * x` where the row has it; guidance on the raw output
    (`remove_parallel` or `standard`), the data prediction, then the stage's thresholding.

    `self_cond` (the previous data prediction, zeros when None) is fed when the Unet takes it, and
    `lowres_cond_img` / `lowres_noise_times` condition a super-resolution Unet; every array is of
    the namespace and on the device of `text_embeds`. `calls` counts the Unet calls and
    `engine_seconds` the time inside `backend.run`."""

    def __init__(
        self,
        backend,
        text_embeds,
        text_mask,
        *,
        sampling,
        guidance_scale: float,
        percentile: float,
        lowres_cond_img=None,
        lowres_noise_times=None,
        name: str = "unet",
    ):
        self.backend, self.sampling, self.name = backend, sampling, name
        self.xp, self.device = namespace(text_embeds), device(text_embeds)
        self.guidance_scale, self.percentile = guidance_scale, percentile
        self.batch = text_embeds.shape[0]
        self.copies = 1 if guidance_scale == 1 else 2
        self.rows = self.batch * self.copies
        self.output = f"{sampling.prediction}_pred"
        self.conditioning = null_text_rows(text_embeds, text_mask, self.copies)
        self.conditioning.update(lowres_rows(lowres_cond_img, lowres_noise_times, self.copies))
        self.calls = 0
        self.engine_seconds = 0.0

    def __call__(self, x, row: dict, self_cond=None):
        xp = self.xp
        scaled = row["c_in"] * x if "c_in" in row else x
        feeds = {
            "x": _repeat_rows(scaled, self.copies),
            "time": xp.full((self.rows,), row["time"], dtype=xp.float32, device=self.device),
            **self.conditioning,
        }
        if self.sampling.self_cond:
            cond = xp.zeros_like(x) if self_cond is None else self_cond
            feeds["self_cond"] = _repeat_rows(cond, self.copies)
        start = time.perf_counter()
        out = self.backend.run(feeds)[self.output]
        self.engine_seconds += time.perf_counter() - start
        step = self.calls
        self.calls += 1
        if not bool(xp.all(xp.isfinite(out))):
            raise NonFiniteError(self.name, step, row["time"])
        if self.copies == 2:
            cond, uncond = out[: self.batch, ...], out[self.batch :, ...]
            if self.sampling.guidance == "remove_parallel":
                out = remove_parallel_guidance(cond, uncond, self.guidance_scale)
            else:
                out = apply_guidance(cond, uncond, self.guidance_scale)
        x0 = data_prediction(x, out, row, self.sampling.prediction)
        return threshold(x0, self.sampling.threshold, self.percentile, self.sampling.threshold_max)


def table_lowres_inputs(upsampled, noise: Noise, table: dict) -> dict:
    """The noised low-res conditioning of an imagen-pytorch super-resolution Unet: alpha x + sigma
    noise at the exported noise level, and the time its Unet is fed (the level's log-SNR for Imagen,
    the level itself for ElucidatedImagen), all from the stage's table."""
    xp = namespace(upsampled)
    drawn = noise(tuple(upsampled.shape))
    return {
        "lowres_cond_img": table["lowres_alpha"] * upsampled + table["lowres_sigma"] * drawn,
        "lowres_noise_times": xp.full(
            (upsampled.shape[0],), table["lowres_time"], dtype=xp.float32, device=device(upsampled)
        ),
    }


def sample_table_stage(
    backend,
    sampling,
    previous,
    shape: tuple,
    text_embeds,
    text_mask,
    noise: Noise,
    *,
    guidance_scale: float,
    percentile: float,
    name: str,
    callback: Callable | None,
    timings: dict,
):
    """One imagen-pytorch stage of the cascade: (x in its namespace, the denoiser that made it). A
    super-resolution stage (`previous`, the last stage's image in [-1, 1]) resizes it as the entry says
    and noises it (the low-res draw comes first), then its sampler walks the table from a fresh draw."""
    lowres = {}
    if previous is not None:
        start = time.perf_counter()
        size = shape[-1]
        upsampled = resize_nearest(previous, size) if sampling.resize == "nearest" else resize_image(previous, size)
        timings["resize"] += time.perf_counter() - start
        lowres = table_lowres_inputs(upsampled, noise, sampling.columns)
    denoise = TableDenoiser(
        backend,
        text_embeds,
        text_mask,
        sampling=sampling,
        guidance_scale=guidance_scale,
        percentile=percentile,
        name=name,
        **lowres,
    )
    x = TABLE_SAMPLERS[sampling.sampler](denoise, noise(shape), sampling.columns, noise, callback)
    return x, denoise
