"""Section 7: the PyTorch reference on CUDA, eager FP32, FP16 autocast and torch.compile.

One request is the reference's own sampling of the first Unet (`GuidedDenoiser` and
`run_sampler` of imagen.reference, DPM-Solver++(2M)) on the device: `batch` images, `steps`
Unet calls of 2 x batch rows (cond + uncond). The Unet is a random-weight `sizes.unet` at
`sizes.dim` and `sizes.image_size`; text embeddings are random. Times are wall seconds with
torch.cuda.synchronize() before the clock stops, best of `repeats` after a warm-up. Besides the
whole request, one Unet call at 2 x batch rows is timed alone (median), the unit the TensorRT and
ONNX Runtime rows of section 9 are compared in. torch.compile runs in a child process
(suite.py's `run_child`), so a compile that outlasts the budget is stopped without stopping the bench.
"""

import statistics
import time

from .cascade import autocast, bench_unet, parameter_count, unet_flops

PRECISIONS = {"eager FP32": "fp32", "FP16 autocast": "fp16"}


def synchronize(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class OnDevice:
    """The model, called with the rows the reference's GuidedDenoiser makes on the host (`time`,
    `text_keep`: a few bytes a step) moved to the model's device first."""

    def __init__(self, model, device):
        self.model, self.device = model, device

    def __call__(self, x, time, **kwargs):
        return self.model(x, time.to(self.device), **{k: v.to(self.device) for k, v in kwargs.items()})


class ReferenceRequest:
    """The inputs of one request, made once on `device`, and the request itself for any model
    (the Unet, or torch.compile of it) at any precision."""

    def __init__(self, sizes, device, seed: int = 0):
        import torch

        from imagen.reference.diffusion import GaussianDiffusion
        from imagen.reference.samplers import spaced_timesteps

        self.sizes, self.device = sizes, device
        schedule = GaussianDiffusion(timesteps=sizes.timesteps)
        self.alphas_cumprod = schedule.alphas_cumprod.numpy().copy()  # float64, for the sampler's coefficients
        self.schedule = schedule.to(device)
        self.timesteps = spaced_timesteps(sizes.timesteps, sizes.steps)
        generator = torch.Generator(device).manual_seed(seed)
        b, length = sizes.batch, sizes.text_length
        self.text_embeds = torch.randn(b, length, sizes.text_width, generator=generator, device=device)
        lengths = torch.randint(1, length + 1, (b, 1), generator=generator, device=device)
        self.text_mask = torch.arange(length, device=device)[None, :] < lengths  # (b, length)
        self.x = torch.randn(b, 3, sizes.image_size, sizes.image_size, generator=generator, device=device)

    def sample(self, model, precision: str):
        """x (b, 3, s, s) in [-1, 1] after the reference sampler's `steps` guided Unet calls."""
        import torch

        from imagen.reference.guidance import GuidedDenoiser
        from imagen.reference.samplers import run_sampler

        def noise(shape):
            return torch.randn(shape, device=self.device)

        with torch.no_grad(), autocast(self.device, precision):
            denoise = GuidedDenoiser(
                OnDevice(model, self.device),
                self.schedule,
                self.text_embeds,
                self.text_mask,
                guidance_scale=self.sizes.guidance_scale,
                percentile=0.9,
            )
            x = run_sampler("dpmpp_2m", denoise, self.x, self.alphas_cumprod, self.timesteps, noise, 0.0)
            return x.clamp(-1.0, 1.0)

    def unet_call(self, model, precision: str):
        """One Unet call on the request's [cond; uncond] rows."""
        import torch

        rows = 2 * self.sizes.batch
        with torch.no_grad(), autocast(self.device, precision):
            return model(
                torch.cat([self.x, self.x]),
                torch.full((rows,), 500.0, device=self.device),
                text_embeds=torch.cat([self.text_embeds, self.text_embeds]),
                text_mask=torch.cat([self.text_mask, self.text_mask]),
                text_keep=torch.arange(rows, device=self.device) < self.sizes.batch,
            )


def _seconds(fn, device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def time_variant(request: ReferenceRequest, model, precision: str, flops_per_row: int, calls: int = 5) -> dict:
    """A warm-up request, then the best of `repeats` requests, and the median of `calls` Unet calls."""
    sizes, device = request.sizes, request.device
    first = _seconds(lambda: request.sample(model, precision), device)
    best = min(_seconds(lambda: request.sample(model, precision), device) for _ in range(max(1, sizes.repeats)))
    call = statistics.median(_seconds(lambda: request.unet_call(model, precision), device) for _ in range(calls))
    return {
        "first_request_s": first,
        "s_per_image": best / sizes.batch,
        "unet_call_ms": 1e3 * call,
        "unet_s_per_image": sizes.steps * call / sizes.batch,
        "tflops": 2 * sizes.batch * flops_per_row / call / 1e12,
    }


def describe_unet(sizes, unet) -> dict:
    return {
        "preset": sizes.unet,
        "dim": sizes.dim,
        "image_size": sizes.image_size,
        "parameters": parameter_count(unet),
        "flops_per_row": unet_flops(unet.config, sizes.image_size),
    }


def reference_section(sizes, device: str, *, precisions=PRECISIONS, say=print) -> dict:
    """Eager rows measured here (FP16 only on CUDA); the compile row is added by the caller."""
    import torch

    unet = bench_unet(sizes.unet, sizes.dim, 0, sizes.text_width, sizes.text_length, device)
    info = describe_unet(sizes, unet)
    request = ReferenceRequest(sizes, device)
    rows, reasons = {}, {}
    for name, precision in precisions.items():
        if precision == "fp16" and torch.device(device).type != "cuda":
            reasons[name] = "FP16 autocast is measured on CUDA only"
            continue
        say(f"section 7: {name}")
        rows[name] = time_variant(request, unet, precision, info["flops_per_row"])
    del unet, request
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return {"config": {"device": device, **sizes.to_dict()}, "unet": info, "rows": rows, "reasons": reasons}


def compile_child(sizes, device: str, precision: str) -> dict:
    """Runs in a child process: torch.compile of the same Unet; the first request's extra time is
    the compile time."""
    import torch

    unet = bench_unet(sizes.unet, sizes.dim, 0, sizes.text_width, sizes.text_length, device)
    flops = unet_flops(unet.config, sizes.image_size)
    compiled = torch.compile(unet)
    row = time_variant(ReferenceRequest(sizes, device), compiled, precision, flops)
    row["compile_s"] = max(0.0, row["first_request_s"] - row["s_per_image"] * sizes.batch)
    row["precision"] = precision
    return row
