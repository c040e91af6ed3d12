"""The per-step tables of imagen-pytorch's stages, computed with torch as imagen-pytorch 2.1.0 computes
them (docs/bundle.md, Continuous time).

imagen-pytorch feeds its Unets float32 values that torch computes in its own order of operations: the
log-SNR of t = linspace(1, 0, T + 1) (at t = 1 the float32 cosine log-SNR is about -33.9, not the
-75 of float64), alpha and sigma from it, the posterior's coefficients, Karras sigmas and EDM's
preconditioning. NumPy cannot reproduce those bit for bit (torch's float32 linspace and its cos, log
and expm1 differ from NumPy's by an ulp in places), so the exporter computes every scalar the loop
multiplies by here, with torch, and writes it in the stage's sampling entry; the runtime only
multiplies and adds (runtime/continuous.py).

Each scalar is computed on a tensor of one element, which takes torch's element-by-element kernels,
as imagen-pytorch's tensors of one value per image do for batches under 32 (larger batches may take
vector kernels whose transcendental functions differ in the last bit). The formulas and their order
are imagen_pytorch.py's (GaussianDiffusionContinuousTimes, `alpha_cosine_log_snr`,
`beta_linear_log_snr`, q_posterior, p_sample) and elucidated_imagen.py's (sample_schedule, the gammas,
c_skip, c_out, c_in, c_noise).
"""

import math

import torch

COSINE_OFFSET = 0.008  # alpha_cosine_log_snr's s


def log_snr(schedule: str, t: torch.Tensor) -> torch.Tensor:
    """imagen-pytorch's log-SNR of continuous times t in [0, 1] (float32): `cosine`
    -log(clamp(cos((t + s) / (1 + s) pi / 2) ** -2 - 1, 1e-5)), or `linear` (its beta_linear)
    -log(expm1(1e-4 + 10 t ** 2))."""
    if schedule == "linear":
        return -torch.log(torch.special.expm1(1e-4 + 10 * (t**2)))
    if schedule != "cosine":
        raise ValueError(f"unknown noise schedule {schedule!r}; imagen-pytorch has cosine and linear")
    s = COSINE_OFFSET
    return -torch.log(((torch.cos((t + s) / (1 + s) * math.pi * 0.5) ** -2) - 1).clamp(min=1e-5))


def alpha_sigma(log_snr_value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.sqrt(torch.sigmoid(log_snr_value)), torch.sqrt(torch.sigmoid(-log_snr_value))


def _value(tensor: torch.Tensor) -> float:
    """A one-element float32 tensor as a Python float (exact: every float32 is a float64)."""
    return float(tensor.reshape(()).item())


def continuous_table(schedule: str, steps: int) -> dict[str, list[float]]:
    """Per step k of `steps` (t = times[k], t_next = times[k + 1], times = linspace(1, 0, steps + 1)):
    `time`, the log-SNR the Unet is fed; `alpha`, `sigma` at t; `alpha_next`; `c` = -expm1(l - l_next)
    and `one_minus_c`; `noise_std`, the posterior's std exp(log(clamp(sigma_next^2 c, 1e-20)) / 2),
    times 0 on the last step (t_next = 0)."""
    times = torch.linspace(1.0, 0.0, steps + 1)
    table = {name: [] for name in ("time", "alpha", "sigma", "alpha_next", "c", "one_minus_c", "noise_std")}
    for k in range(steps):
        t, t_next = times[k : k + 1], times[k + 1 : k + 2]
        current, following = log_snr(schedule, t), log_snr(schedule, t_next)
        alpha, sigma = alpha_sigma(current)
        alpha_next, sigma_next = alpha_sigma(following)
        c = -torch.special.expm1(current - following)
        log_variance = torch.log((sigma_next**2 * c).clamp(min=1e-20))
        nonzero = 1 - (t_next == 0).float()
        values = dict(time=current, alpha=alpha, sigma=sigma, alpha_next=alpha_next, c=c, one_minus_c=1 - c)
        values["noise_std"] = nonzero * (0.5 * log_variance).exp()
        for name, value in values.items():
            table[name].append(_value(value))
    return table


def lowres_scalars(schedule: str, level: float, feed_log_snr: bool) -> dict[str, float]:
    """The low-res image's noising at `level` (q_sample of the low-res schedule: alpha x + sigma noise)
    and the time its Unet is fed: the level's log-SNR (Imagen), or the level itself (ElucidatedImagen's
    sampling; its training fed the log-SNR)."""
    t = torch.full((1,), level, dtype=torch.float32)
    current = log_snr(schedule, t)
    alpha, sigma = alpha_sigma(current)
    time = current if feed_log_snr else t
    return {"lowres_time": _value(time), "lowres_alpha": _value(alpha), "lowres_sigma": _value(sigma)}


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float) -> torch.Tensor:
    """Karras et al. 2022, eq. 5, as ElucidatedImagen.sample_schedule: `steps` sigmas from sigma_max to
    sigma_min (float32), then 0."""
    inv_rho = 1 / rho
    index = torch.arange(steps, dtype=torch.float32)
    sigmas = (sigma_max**inv_rho + index / (steps - 1) * (sigma_min**inv_rho - sigma_max**inv_rho)) ** rho
    return torch.nn.functional.pad(sigmas, (0, 1), value=0.0)


def _preconditioning(sigma: float, sigma_data: float) -> dict[str, float]:
    """EDM's Table 1 at one sigma, as ElucidatedImagen.preconditioned_network_forward computes it for a
    sigma given as a Python float: c_in, c_skip, c_out and the time fed, c_noise = log(sigma) / 4."""
    s = torch.full((1,), sigma)
    return {
        "time": _value(torch.log(s.clamp(min=1e-20)) * 0.25),
        "c_in": _value(1 * (s**2 + sigma_data**2) ** -0.5),
        "c_skip": _value((sigma_data**2) / (s**2 + sigma_data**2)),
        "c_out": _value(s * sigma_data * (sigma_data**2 + s**2) ** -0.5),
    }


def karras_table(
    steps: int,
    sigma_min: float,
    sigma_max: float,
    sigma_data: float,
    rho: float,
    S_churn: float,
    S_tmin: float,
    S_tmax: float,
    S_noise: float,
) -> dict:
    """Per step: `sigma`, `sigma_next`, `gamma` (min(S_churn / N, sqrt 2 - 1) where S_tmin <= sigma <=
    S_tmax, else 0); the preconditioning at sigma_hat = sigma (1 + gamma) (`time`, `c_in`, `c_skip`,
    `c_out`) and at sigma_next (`..._next`, zeros on the last step, which makes no second call);
    `init_sigma` (the initial image is init_sigma times a standard normal one) and `S_noise`."""
    sigmas = karras_sigmas(steps, sigma_min, sigma_max, rho)
    gammas = torch.where((sigmas >= S_tmin) & (sigmas <= S_tmax), min(S_churn / steps, math.sqrt(2) - 1), 0.0)
    table = {"init_sigma": _value(sigmas[0]), "S_noise": float(S_noise)}
    columns = ("sigma", "sigma_next", "gamma", "time", "c_in", "c_skip", "c_out")
    columns += ("time_next", "c_in_next", "c_skip_next", "c_out_next")
    table.update({name: [] for name in columns})
    for k in range(steps):
        sigma, sigma_next, gamma = sigmas[k].item(), sigmas[k + 1].item(), gammas[k].item()
        sigma_hat = sigma + gamma * sigma
        first = _preconditioning(sigma_hat, sigma_data)
        second = _preconditioning(sigma_next, sigma_data) if sigma_next != 0 else dict.fromkeys(first, 0.0)
        for name, value in dict(sigma=sigma, sigma_next=sigma_next, gamma=gamma, **first).items():
            table[name].append(value)
        for name, value in second.items():
            table[f"{name}_next"].append(value)
    return table
