"""imagen-pytorch's own sampling, run in a child process for the tests to hold the runtime against.

`python tests/imagen_pytorch_sample.py JOB.json` (JOB's "mode"):
- "tables": imagen-pytorch's float32 scalars at batch 2 (log-SNR of its sampling times and of a grid
  holding t = 0 and t = 1, alpha and sigma; ElucidatedImagen's sigmas, gammas and preconditioning at
  every sigma_hat and sigma_next), written to OUT (.npz) for the bit-for-bit comparison with
  export/imagen_pytorch_tables.py;
- "sample": `Imagen.sample` / `ElucidatedImagen.sample` of a checkpoint on given text embeddings,
  with every `torch.randn` / `torch.randn_like` answered, in order, from the job's draws (the shapes
  are checked), recording per Unet call the image it denoises and the data prediction it returns,
  and the final images. Written to OUT (.npz);
- "time": the best wall time of `repeats` sample() calls (the benchmark's, bench/cpu/imagen_pytorch.py).

As tests/imagen_pytorch_tiny.py, the child sets up imagen-pytorch offline (a hub cache holding only
the T5 config it reads at import, and a stand-in torchvision where the real one cannot be imported).
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from imagen_pytorch_tiny import offline_environment, write_t5_config_cache  # noqa: E402


def run_child(job: dict, root: Path, timeout: float = 600) -> dict:
    """Runs the job in a child process; returns the arrays it wrote."""
    root.mkdir(parents=True, exist_ok=True)
    write_t5_config_cache(root / "hub")
    job_path = root / f"job-{job['mode']}.json"
    job = {**job, "out": str(root / f"out-{job['mode']}.npz")}
    job_path.write_text(json.dumps(job))
    done = subprocess.run(
        [sys.executable, __file__, str(job_path)],
        env=offline_environment(root / "hub"),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if done.returncode != 0:
        raise RuntimeError(f"imagen-pytorch's child failed:\n{done.stdout}\n{done.stderr}")
    with np.load(job["out"]) as arrays:
        return dict(arrays)


def readme_commands(files: dict, root: Path) -> list[list[str]]:
    """README's imagen-pytorch commands with the tiny cascade's files put in (and --fp16 left out: the
    FP16 export has its own test)."""
    import shlex

    readme = HERE.parent / "README.md"
    block = readme.read_text().split("## imagen-pytorch checkpoints", 1)[1].split("```")[1]
    names = {"checkpoint.pt": files["imagen"], "t5-v1_1-base": files["t5"], "bundles/imagen": root / "bundle-imagen"}
    names["panda.png"] = root / "panda.png"
    lines = block.strip().splitlines()
    return [[str(names.get(word, word)) for word in shlex.split(line) if word != "--fp16"] for line in lines]


def _tables(job: dict) -> dict:
    import torch
    from imagen_pytorch import ElucidatedImagen, load_imagen_from_checkpoint
    from imagen_pytorch.imagen_pytorch import GaussianDiffusionContinuousTimes, log_snr_to_alpha_sigma

    out = {}
    grid = torch.linspace(0.0, 1.0, 257)
    for schedule in ("cosine", "linear"):
        for steps in job["steps"]:
            scheduler = GaussianDiffusionContinuousTimes(noise_schedule=schedule, timesteps=steps)
            pairs = scheduler.get_sampling_timesteps(2, device=torch.device("cpu"))
            times = torch.stack([t[0] for t, _ in pairs])
            # per step, on the batch's tensor (2 values), as p_sample computes them
            log_snr = torch.stack([scheduler.log_snr(t)[0] for t, _ in pairs])
            alpha = torch.stack([log_snr_to_alpha_sigma(scheduler.log_snr(t))[0][0] for t, _ in pairs])
            sigma = torch.stack([log_snr_to_alpha_sigma(scheduler.log_snr(t))[1][0] for t, _ in pairs])
            out.update({f"{schedule}_{steps}_t": times.numpy(), f"{schedule}_{steps}_log_snr": log_snr.numpy()})
            out.update({f"{schedule}_{steps}_alpha": alpha.numpy(), f"{schedule}_{steps}_sigma": sigma.numpy()})
        out[f"{schedule}_grid"] = torch.stack([scheduler.log_snr(t.repeat(2))[0] for t in grid]).numpy()
    out["grid"] = grid.numpy()
    model = load_imagen_from_checkpoint(job["elucidated"]).eval()
    assert isinstance(model, ElucidatedImagen)
    for name, hp in job["karras"].items():
        sigmas = model.sample_schedule(hp["steps"], hp["rho"], hp["sigma_min"], hp["sigma_max"]).cpu()
        gammas = torch.where(
            (sigmas >= hp["S_tmin"]) & (sigmas <= hp["S_tmax"]), min(hp["S_churn"] / hp["steps"], 2**0.5 - 1), 0.0
        )
        rows = {key: [] for key in ("c_in", "c_skip", "c_out", "c_noise")}
        for k in range(hp["steps"]):
            sigma, gamma, sigma_next = sigmas[k].item(), gammas[k].item(), sigmas[k + 1].item()
            for value in (sigma + gamma * sigma, sigma_next):
                s = torch.full((2,), value).reshape(2, 1, 1, 1)
                rows["c_in"].append(model.c_in(hp["sigma_data"], s)[0, 0, 0, 0])
                rows["c_skip"].append(model.c_skip(hp["sigma_data"], s)[0, 0, 0, 0])
                rows["c_out"].append(model.c_out(hp["sigma_data"], s)[0, 0, 0, 0])
                rows["c_noise"].append(model.c_noise(s.reshape(2))[0])
        out[f"{name}_sigmas"], out[f"{name}_gammas"] = sigmas.numpy(), gammas.numpy()
        out.update({f"{name}_{key}": torch.stack(values).numpy() for key, values in rows.items()})
    return out


def _sample(job: dict) -> dict:
    import torch
    from imagen_pytorch import ElucidatedImagen, load_imagen_from_checkpoint

    with np.load(job["inputs"]) as arrays:
        inputs = dict(arrays)
    draws = [torch.from_numpy(inputs[f"draw_{i}"]) for i in range(int(inputs["draws"]))]
    imagen = load_imagen_from_checkpoint(job["checkpoint"], load_ema_if_available=job["ema"]).eval()
    taken = []

    def draw(shape):
        if not draws:
            raise AssertionError(f"imagen-pytorch drew more than the {len(taken)} draws given")
        value = draws.pop(0)
        if tuple(value.shape) != tuple(shape):
            raise AssertionError(f"draw {len(taken)}: imagen-pytorch wants {tuple(shape)}, given {tuple(value.shape)}")
        taken.append(tuple(shape))
        return value.clone()

    calls = {"x": [], "x0": []}
    if isinstance(imagen, ElucidatedImagen):
        forward = imagen.preconditioned_network_forward

        def record(unet_forward, noised_images, sigma, **kwargs):
            out = forward(unet_forward, noised_images, sigma, **kwargs)
            calls["x"].append(noised_images.clone())
            calls["x0"].append(out.clone())
            return out

        imagen.preconditioned_network_forward = record
    else:
        forward = imagen.p_mean_variance

        def record(unet, x, t, **kwargs):
            out = forward(unet, x, t, **kwargs)
            calls["x"].append(x.clone())
            calls["x0"].append(out[1].clone())
            return out

        imagen.p_mean_variance = record
    randn, randn_like = torch.randn, torch.randn_like
    torch.randn = lambda *shape, **kwargs: draw(
        shape[0] if len(shape) == 1 and not isinstance(shape[0], int) else shape
    )
    torch.randn_like = lambda tensor, **kwargs: draw(tensor.shape)
    try:
        with torch.no_grad():
            images = imagen.sample(
                text_embeds=torch.from_numpy(inputs["text_embeds"]),
                text_masks=torch.from_numpy(inputs["text_masks"]),
                cond_scale=float(job["cond_scale"]),
                use_tqdm=False,
            )
    finally:
        torch.randn, torch.randn_like = randn, randn_like
    if draws:
        raise AssertionError(f"imagen-pytorch left {len(draws)} of the draws unused (took {len(taken)})")
    out = {"images": images.numpy(), "calls": np.array(len(calls["x"]))}
    for i, (x, x0) in enumerate(zip(calls["x"], calls["x0"])):
        out[f"x_{i}"], out[f"x0_{i}"] = x.numpy(), x0.numpy()
    return out


def _time(job: dict) -> dict:
    """Best wall time of `repeats` sample() calls on the job's text embeddings (torch's own draws)."""
    import time

    import torch
    from imagen_pytorch import load_imagen_from_checkpoint

    torch.set_num_threads(int(job["threads"]))
    with np.load(job["inputs"]) as arrays:
        embeds, masks = torch.from_numpy(arrays["text_embeds"]), torch.from_numpy(arrays["text_masks"])
    imagen = load_imagen_from_checkpoint(job["checkpoint"], load_ema_if_available=job["ema"]).eval()
    best = float("inf")
    for _ in range(int(job["repeats"])):
        start = time.perf_counter()
        with torch.no_grad():
            imagen.sample(text_embeds=embeds, text_masks=masks, cond_scale=float(job["cond_scale"]), use_tqdm=False)
        best = min(best, time.perf_counter() - start)
    return {"seconds": np.array(best)}


def main(job_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    from imagen.export.imagen_pytorch_onnx import import_imagen_pytorch

    import_imagen_pytorch()
    out = {"tables": _tables, "sample": _sample, "time": _time}[job["mode"]](job)
    np.savez(job["out"], **out)


if __name__ == "__main__":
    main(sys.argv[1])
