"""Section 1: the PyTorch eager reference against the runtime on the same request (sampler,
steps, sr_strength, guidance, batch and noise), wall time per image and how far the images
differ. Target: the runtime at least 2.0x faster."""

from pathlib import Path

import numpy as np

from ..prompts import prompts_for
from .timing import interleaved
from .workload import bundle_source, generate, load_pipeline, resolve_settings, same_run, warm

TARGET_SPEEDUP = 2.0


def _skipped(run_dir) -> dict:
    return {
        "skipped": f"no run directory ({run_dir or 'runs/demo'} does not exist); pass --run RUN_DIR, the "
        "run the bundle was exported from, to compare the reference with the runtime"
    }


def _reference_images(run, prompts, settings, seed: int, *, sampler=None, steps=None):
    """The reference cascade on `prompts` with the runtime's settings: uint8 (b, h, w, c), the runtime's rounding."""
    from imagen.runtime.images import to_uint8

    embeds, mask = run.text_encoder.encode(prompts)
    images = run.imagen.sample(
        embeds,
        mask,
        guidance_scale=settings.guidance_scale,
        sampler=sampler or settings.sampler,
        steps=steps or tuple(settings.steps),
        sr_strength=settings.sr_strength,
        noise=np.random.Generator(np.random.PCG64(seed)),
    )
    return to_uint8(images.numpy())


def reference_vs_runtime(
    run_dir, bundle, *, threads: int, sampler=None, steps=None, batch: int = 4, seed: int = 0, repeats: int = 1
) -> dict:
    """Best wall time per image of each side over `repeats` interleaved rounds; both draw their
    noise from one Generator(PCG64(seed))."""
    if run_dir is None or not Path(run_dir).is_dir():
        return _skipped(run_dir)
    import torch

    from imagen.reference.checkpoint import load_run

    torch.set_num_threads(threads)
    pipe = load_pipeline(bundle, threads)
    batch = min(batch, pipe.bundle.max_batch)
    settings = resolve_settings(pipe, sampler=sampler, steps=steps, seed=seed)
    exported_from, weights = bundle_source(pipe.bundle)
    weights = weights or "latest"
    run = load_run(run_dir, weights)
    prompts = prompts_for(batch)

    def reference():
        return _reference_images(run, prompts, settings, seed)

    def runtime():
        return generate(pipe, prompts, settings).array

    _reference_images(run, prompts[:1], settings, seed, sampler="ddim", steps=1)  # warm both, a short request
    warm(pipe, seed)
    best, images = interleaved({"reference": reference, "runtime": runtime}, repeats)
    diff = np.abs(images["reference"].astype(np.int16) - images["runtime"].astype(np.int16))
    speedup = best["reference"] / best["runtime"]
    return {
        "config": {
            "run": str(run_dir),
            "bundle_source": exported_from,
            # the config hash when the manifest records one; None when it records no source at all
            "same_run": same_run(pipe.bundle.manifest.source, run_dir),
            "weights": weights,
            "sampler": settings.sampler,
            "steps": list(settings.steps),
            "sr_strength": settings.sr_strength,
            "batch": batch,
            "guidance_scale": settings.guidance_scale,
            "seed": seed,
            "threads": threads,
            "repeats": max(1, repeats),
        },
        "reference_s_per_image": best["reference"] / batch,
        "runtime_s_per_image": best["runtime"] / batch,
        "speedup": speedup,
        "uint8_max_diff": int(diff.max()),
        "uint8_fraction_over_1": float(np.mean(diff > 1)),
        "target": {
            "what": "runtime speed-up over the reference",
            "value": speedup,
            "unit": "x",
            "goal": f">= {TARGET_SPEEDUP}x",
            "met": speedup >= TARGET_SPEEDUP,
        },
    }
