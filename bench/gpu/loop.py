"""Section 8: the runtime's sampling loop (`Pipeline.sample`) with the reference Unet as its engine,
once in NumPy (feeds copied to the Unet's device and back every call) and once in the device's
array namespace (CuPy through DLPack on a GPU): how far their images differ, and the time a
request spends outside engine calls. Target on the GPU: at most 3% of a request.

A request is `Pipeline.sample` on encoded text plus the final uint8 images on the host
(`Pipeline.to_images`); the text is encoded once, before. Engine time is the runtime's own
count of the seconds inside `backend.run` (`timings["engine"]`), which includes the NumPy loop's
copies. On the CPU the NumPy loop is also compared with ONNX Runtime on the bundle's own Unets.
"""

import time

import numpy as np

from ..prompts import prompts_for
from .cascade import DLPackUnetBackend, TorchUnetBackend, bench_unet, parameter_count, unet_flops

TARGET_PERCENT = 3.0
UNETS = {True: "the run's own (its bundle's ONNX files)", False: "random-weight bench Unets"}


def engine_unets(run_dir, bundle, sizes, device, own: bool) -> tuple[list, list[dict]]:
    """The Unets the loop calls, on `device`, and one row per Unet describing it. `own`: the run's
    Unets (the ones its bundle's ONNX files hold); else random-weight Unets of the bench's presets
    and widths at the bundle's image sizes and text shape."""
    from imagen.reference.checkpoint import load_run

    manifest = bundle.manifest
    if own:
        unets = [unet.to(device).eval() for unet in load_run(run_dir).imagen.unets]
        presets = [("run", unet.config.dim) for unet in unets]
    else:
        presets = [(sizes.unet, sizes.dim)] + [(sizes.super_unet, sizes.super_dim)] * (len(manifest.image_sizes) - 1)
        unets = [
            bench_unet(preset, dim, index, manifest.embed_dim, manifest.max_length, device)
            for index, (preset, dim) in enumerate(presets)
        ]
    rows = [
        {
            "stage": f"unet_{index}",
            "preset": preset,
            "dim": dim,
            "image_size": size,
            "parameters": parameter_count(unet),
            "flops_per_row": unet_flops(unet.config, size),
        }
        for index, ((preset, dim), unet, size) in enumerate(zip(presets, unets, manifest.image_sizes, strict=True))
    ]
    return unets, rows


def loop_backends(base, unets: list, xp, precision: str) -> dict:
    """The base pipeline's backends with its Unets replaced: NumPy loop when xp is None, else the
    DLPack backend in namespace xp. "onnxruntime" (a str) keeps the bundle's own ONNX Unets."""
    if xp == "onnxruntime":
        return dict(base.backends)
    backends = dict(base.backends)
    for stage, unet in zip(base.bundle.unets, unets, strict=True):
        if xp is None:
            backends[stage.name] = TorchUnetBackend(unet, stage.signature, precision)
        else:
            backends[stage.name] = DLPackUnetBackend(unet, stage.signature, xp, precision)
    return backends


def one_request(pipe, text_embeds, text_mask, settings, seed: int) -> dict:
    """One timed request (noise from PCG64(seed) on the host): its timings and its final x on the host."""
    from imagen.runtime.arrays import to_numpy

    generator = np.random.Generator(np.random.PCG64(seed))

    def noise(shape):
        return generator.standard_normal(tuple(shape), dtype=np.float32)

    timings = {}
    start = time.perf_counter()
    x = pipe.sample(text_embeds, text_mask, noise, settings, timings=timings)
    images = pipe.to_images(x)
    total = time.perf_counter() - start
    return {
        "total": total,
        "engine": timings["engine"],
        "engine_calls": int(timings["engine_calls"]),
        "resize": timings["resize"],
        "x": to_numpy(x),
        "images": images,
    }


def measure_loop(pipe, text_embeds, text_mask, settings, seed: int, repeats: int) -> tuple[dict, dict]:
    """The fastest of `repeats` requests after a warm-up (row for the report, and its arrays)."""
    one_request(pipe, text_embeds, text_mask, settings, seed)
    best = min(
        (one_request(pipe, text_embeds, text_mask, settings, seed) for _ in range(max(1, repeats))),
        key=lambda r: r["total"],
    )
    total, engine, calls = best["total"], best["engine"], best["engine_calls"]
    row = {
        "total_s": total,
        "engine_s": engine,
        "outside_s": total - engine,
        "outside_percent": 100 * (total - engine) / total,
        "engine_calls": calls,
        "engine_ms_per_call": 1e3 * engine / calls,
        "outside_ms_per_call": 1e3 * (total - engine) / calls,
        "resize_s": best["resize"],
    }
    return row, {"x": best["x"], "images": best["images"]}


def compare(a: dict, b: dict) -> dict:
    """How far two loops' final x (float32, [-1, 1]) and uint8 images differ."""
    images = np.abs(a["images"].astype(np.int16) - b["images"].astype(np.int16))
    return {
        "max_abs_x": float(np.max(np.abs(a["x"].astype(np.float64) - b["x"].astype(np.float64)))),
        "uint8_max_diff": int(images.max()),
        "uint8_fraction_over_1": float(np.mean(images > 1)),
    }


def encoded_text(base, batch: int):
    """(text_embeds, text_mask) on the host for `batch` prompts, through the bundle's text encoder."""
    input_ids, attention_mask, _ = base.tokenizer(prompts_for(batch))
    embeds = base.encode(input_ids, attention_mask)
    return base.text_conditioning(embeds, attention_mask, 1)


def _variant_name(xp) -> str:
    if xp is None:
        return "numpy"
    return xp if isinstance(xp, str) else xp.__name__.rsplit(".", 1)[-1]


def _target(rows: dict, device_loop: str | None, device: str) -> dict:
    """The target is the GPU loop's; on the CPU the NumPy loop's share is shown, not judged."""
    name = device_loop or "numpy"
    share = rows[name]["outside_percent"]
    on_gpu = device != "cpu"
    return {
        "what": f"time outside engine calls, share of a request ({name} loop, {device})",
        "value": share,
        "unit": "%",
        "goal": f"<= {TARGET_PERCENT:.0f}%" + ("" if on_gpu else " on the GPU (not judged on the CPU)"),
        "met": share <= TARGET_PERCENT if on_gpu else None,
    }


def loop_section(
    bundle_dir,
    run_dir,
    sizes,
    *,
    device: str,
    device_namespace=None,
    own_unets: bool = True,
    precision: str = "fp32",
    threads: int | None = None,
    seed: int = 0,
    say=print,
) -> dict:
    """The loops side by side on one request: NumPy, then `device_namespace` (CuPy's on a GPU; None:
    NumPy only), and ONNX Runtime when the Unets are the bundle's own and run on the CPU."""
    from imagen.runtime import Pipeline

    base = Pipeline.load(bundle_dir, backend="onnxruntime", threads=threads)
    batch = min(sizes.batch, base.max_batch)
    unets, unet_rows = engine_unets(run_dir, base.bundle, sizes, device, own_unets)
    steps = [min(sizes.steps, total) for total in base.bundle.timesteps]
    settings = base.settings(sampler="dpmpp_2m", steps=steps, sr_strength=1.0, guidance_scale=sizes.guidance_scale)
    request = (*encoded_text(base, batch), settings, seed)
    variants = [None] + ([device_namespace] if device_namespace is not None else [])
    if own_unets and device == "cpu":
        variants.append("onnxruntime")
    rows, arrays = {}, {}
    for xp in variants:
        name = _variant_name(xp)
        say(f"section 8: the {name} loop")
        pipe = Pipeline(base.bundle, loop_backends(base, unets, xp, precision), base.tokenizer, name)
        rows[name], arrays[name] = measure_loop(pipe, *request, sizes.repeats)
    first, *others = list(rows)
    config = dict(device=device, precision=precision, batch=batch, repeats=sizes.repeats, seed=seed, threads=threads)
    return {
        "config": {**config, **settings.to_info(), "unets": UNETS[own_unets]},
        "unets": unet_rows,
        "loops": rows,
        "parity": [{"a": first, "b": other, **compare(arrays[first], arrays[other])} for other in others],
        "target": _target(rows, None if device_namespace is None else _variant_name(device_namespace), device),
    }
