"""The Markdown of a `python -m bench.gpu` run: the environment, then one part per section, each row
either measured or a line saying why not. Ready to paste under "GPU (python -m bench.gpu)" in
docs/benchmarks.md (its headings start at level 3)."""

from ..markdown import fmt, table

LOOPS = {
    "numpy": "NumPy loop (torch Unet, feeds copied to its device and back)",
    "cupy": "CuPy loop (DLPack, arrays stay on the device)",
    "onnxruntime": "NumPy loop, ONNX Runtime (CPU) Unets of the bundle",
}
TITLES = {
    "reference": "7. Reference on CUDA (PyTorch)",
    "loop": "8. Sampling loop: CuPy against NumPy",
    "engines": "9. TensorRT and ONNX Runtime on the GPU",
}


def _gpu_line(env: dict) -> str:
    gpu = env["gpu"]
    if gpu is None:
        return f"none: {env['no_gpu_reason']}"
    return (
        f"{gpu['name']} (compute capability {gpu['compute_capability']}, {gpu['memory_gib']} GiB; "
        f"{gpu['count']} visible)"
    )


def _cuda_line(env: dict) -> str:
    gpu = env["gpu"]
    if gpu is None:
        return "n/a"
    api = gpu.get("driver_cuda_api")
    api = f", driver CUDA API {api // 1000}.{api % 1000 // 10}" if api else ""
    return (
        f"driver {gpu['driver'] or 'unknown (no nvidia-smi)'}{api}; torch built for CUDA {gpu['torch_cuda']}, "
        f"cuDNN {gpu['cudnn']}; TF32 matmul {fmt(gpu['tf32_matmul'])}, TF32 cuDNN {fmt(gpu['tf32_cudnn'])} "
        "(torch's settings, not changed)"
    )


def environment_part(env: dict) -> list[str]:
    m = env["machine"]
    ort = env["onnxruntime"]
    rows = [
        ["date", env["date"]],
        ["GPU", _gpu_line(env)],
        ["driver / CUDA", _cuda_line(env)],
        ["CPU", f"{m['cpu']}, {m['physical_cores']} cores / {m['logical_cpus']} logical CPUs, {m['memory']} RAM"],
        ["Python / numpy", f"{m['versions']['python']} / {m['versions']['numpy']}"],
        ["torch", env["torch"]],
        ["CuPy", env["cupy"]],
        ["onnxruntime", f"{ort['version']} ({', '.join(ort['providers']) or 'no providers'})"],
        ["tensorrt", env["tensorrt"]],
        ["tensorrt_lean", env["tensorrt_lean"]],
    ]
    return ["#### 6. Environment", "", *table(["", ""], rows)]


def _reasons(reasons: dict) -> list[str]:
    lines = [f"- {name}: not measured: {reason}" for name, reason in reasons.items()]
    return lines + [""] if lines else []


def _unet_line(unet: dict) -> str:
    return (
        f"{unet['preset']} dim {unet['dim']} at {unet['image_size']}x{unet['image_size']}, "
        f"{fmt(unet['parameters'] / 1e6)} M parameters, {fmt(unet['flops_per_row'] / 1e9)} GFLOP per row"
    )


def reference_part(section: dict) -> list[str]:
    c = section["config"]
    lines = [
        f"Unet: {_unet_line(section['unet'])} (random weights). Device {c['device']}; the reference sampler "
        f"(DPM-Solver++(2M), {c['steps']} steps), batch {c['batch']} ({2 * c['batch']} Unet rows with guidance "
        f"{c['guidance_scale']}); best of {c['repeats']} after a warm-up, synchronized; one Unet call: median of 5.",
        "",
    ]
    rows = [
        [
            name,
            r["s_per_image"],
            r["unet_call_ms"],
            r["unet_s_per_image"],
            r["tflops"],
            r.get("compile_s", ""),
        ]
        for name, r in section["rows"].items()
    ]
    if rows:
        columns = ["variant", "s / image (request)", "ms / Unet call", "Unet s / image", "TFLOP/s", "compile s"]
        lines += table(columns, rows)
    return lines + _reasons(section["reasons"])


def loop_part(section: dict) -> list[str]:
    c = section["config"]
    unets = "; ".join(f"{u['stage']}: {_unet_line(u)}" for u in section["unets"])
    lines = [
        f"`Pipeline.sample` + final uint8 images, one request of {c['batch']} images, {c['sampler']} "
        f"{c['steps']} steps, sr_strength {c['sr_strength']}, guidance {c['guidance_scale']}; engine: "
        f"{c['unets']} ({c['precision']}, {c['device']}): {unets}. Best of {c['repeats']} after a warm-up.",
        "",
    ]
    columns = ["loop", "total s", "engine s", "outside s", "outside %", "engine calls", "ms / call in / out"]
    rows = [
        [LOOPS.get(name, name), r["total_s"], r["engine_s"], r["outside_s"], f"{r['outside_percent']:.2f}%"]
        + [r["engine_calls"], f"{fmt(r['engine_ms_per_call'])} / {fmt(r['outside_ms_per_call'])}"]
        for name, r in section["loops"].items()
    ]
    lines += table(columns, rows)
    for p in section["parity"]:
        lines.append(
            f"- Parity {p['a']} vs {p['b']}: final x max abs difference {p['max_abs_x']:.3g}; uint8 images "
            f"differ by at most {p['uint8_max_diff']} levels ({100 * p['uint8_fraction_over_1']:.3f}% by more than 1)."
        )
    return lines + [""] + _reasons(section.get("reasons", {}))


def engines_part(section: dict) -> list[str]:
    rows = [[name, r["unet_call_ms"], r["unet_s_per_image"], r["setup_s"]] for name, r in section["rows"].items()]
    lines = table(["engine", "ms / Unet call", "Unet s / image", "export-to-ready s"], rows) if rows else []
    return lines + _reasons(section["reasons"])


def _targets(results: dict) -> list[str]:
    rows = [
        [t["what"], f"{fmt(t['value'])} {t['unit']}", t["goal"], "n/a" if t["met"] is None else t["met"]]
        for t in results.get("targets", [])
        if t is not None
    ]
    return ["#### Targets", "", *table(["target", "measured", "goal", "met"], rows)] if rows else []


def render(results: dict) -> str:
    env = results["environment"]
    mode = "smoke run, not a benchmark" if results["smoke"] else "GPU run"
    lines = [
        f"### Run of {env['date']} ({mode})",
        "",
        f"Command: `python -m bench.gpu {' '.join(results['argv'])}`; took {results['seconds']:.0f} s "
        f"(budget {results['budget_s']:.0f} s).",
        "",
        *_targets(results),
        *environment_part(env),
    ]
    parts = {"reference": reference_part, "loop": loop_part, "engines": engines_part}
    for key, title in TITLES.items():
        section = results["sections"].get(key)
        lines += [f"#### {title}", ""]
        if section is None:
            lines += ["Not run (not in --sections).", ""]
        elif "reason" in section:
            lines += [f"Not measured: {section['reason']}", ""]
        else:
            lines += parts[key](section)
    return "\n".join(lines).rstrip() + "\n"
