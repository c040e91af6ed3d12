"""The Markdown report of a run: machine, targets, one part per section; and `write_report`,
which puts it between the bench markers of a file and leaves the rest of the file as it is."""

from pathlib import Path

from ..markdown import fmt, table

START, END = "<!-- bench:start -->", "<!-- bench:end -->"
TITLES = {
    "1": "Reference vs runtime",
    "2": "Unet engine vs GEMM floor",
    "3": "Time outside engine calls",
    "4": "Steps vs quality",
    "5": "Memory and cold start",
}


def _targets(section: dict) -> list[dict]:
    return section.get("targets") or ([section["target"]] if "target" in section else [])


def _header(results: dict) -> list[str]:
    info = results["machine"]
    v = info["versions"]
    return [
        f"## Run of {info['date']}{' (quick mode)' if results['quick'] else ''}",
        "",
        f"Machine: {info['cpu']}, {info['physical_cores']} physical cores / {info['logical_cpus']} logical CPUs, "
        f"{info['memory']} RAM, {info['os']}. Python {v['python']}, numpy {v['numpy']}, onnxruntime "
        f"{v['onnxruntime']}, torch {v['torch']}, onnx {v['onnx']}.",
        "",
        f"Bundle: `{results['bundle']}`; run: `{results['run']}`; threads: {results['threads']}; "
        f"command: `python -m bench {' '.join(results['argv'])}`; took {results['seconds']:.0f} s.",
        "",
    ]


def _summary(sections: dict) -> list[str]:
    rows = []
    for key, title in TITLES.items():
        section = sections.get(key)
        if section is None:
            continue
        if "skipped" in section:
            rows.append([f"{key}. {title}", "skipped", "", ""])
        for t in _targets(section):
            measured = fmt(t["value"]) + t.get("unit", "")
            if "interval" in t:
                measured += " (95% {:.1f} to {:.1f})".format(*t["interval"])
            rows.append([f"{key}. {t['what']}", measured, t["goal"], t["met"]])
    return ["### Targets", ""] + table(["section", "measured", "target", "met"], rows)


def _reference_vs_runtime(r: dict) -> list[str]:
    lines = ["### 1. Reference (PyTorch eager) vs runtime", ""]
    if "skipped" in r:
        return lines + [f"Skipped: {r['skipped']}.", ""]
    c = r["config"]
    lines += [
        f"Same sampler ({c['sampler']}), steps {c['steps']}, sr_strength "
        f"{c.get('sr_strength', 1.0)}, batch {c['batch']}, guidance "
        f"{c['guidance_scale']}, noise (PCG64 seed {c['seed']}); {c['threads']} threads on both "
        f"sides; best of {c['repeats']}. Images differ by at most {r['uint8_max_diff']} uint8 levels "
        f"({r['uint8_fraction_over_1']:.3%} of values by more than 1).",
        "",
    ]
    if c["same_run"] is None:
        lines += [
            f"Note: the bundle records no source to compare with `{c['run']}`; if their weights differ, so do "
            "the images (the timings still compare).",
            "",
        ]
    elif not c["same_run"]:
        lines += [
            f"Note: the bundle was exported from `{c['bundle_source']}`, not `{c['run']}`; if their "
            "weights differ, so do the images (the timings still compare).",
            "",
        ]
    return lines + table(
        ["", "s / image"],
        [
            ["reference (PyTorch eager)", r["reference_s_per_image"]],
            ["runtime (ONNX Runtime + NumPy)", r["runtime_s_per_image"]],
            ["speed-up", r["speedup"]],
        ],
    )


def _session_variants(r: dict) -> list[str]:
    unet = r["test_unet"]["config"]
    size, dim = unet["image_size"], unet["dim"]
    lines = [
        f"ONNX Runtime session options on the {size}x{size} dim-{dim} base Unet (batch 2; the timed calls "
        "are taken round-robin over the variants, so drift of the machine spreads over all of them):",
        "",
    ]
    variants = r["session_variants"]
    reference = next((v for v in variants if v["variant"].startswith("ENABLE_ALL (")), variants[0])
    lines += table(
        [
            "variant",
            "expected",
            "threads",
            "median ms",
            "vs ENABLE_ALL",
            "best ms",
            "% of GEMM (median)",
            "session create s",
        ],
        [
            [
                v["variant"],
                v.get("prediction", ""),
                v["threads"],
                v["median_s"] * 1e3,
                f"{100 * (v['median_s'] / reference['median_s'] - 1):+.1f}%",
                v["best_s"] * 1e3,
                f"{v['percent_of_gemm']:.1f}%",
                v["session_create_s"],
            ]
            for v in variants
        ],
    )
    return lines + [f"Fastest: {r['best_variant']}.", ""]


def _engine_efficiency(r: dict) -> list[str]:
    g = r["gemm"]
    lines = [
        "### 2. Unet engine time vs the GEMM floor",
        "",
        f"GEMM rate, float32 {g['numpy']['n']}x{g['numpy']['n']} matrix product, best of several, "
        f"{r['threads']} threads: NumPy {g['numpy']['gflops']:.1f} GFLOP/s, ONNX Runtime MatMul "
        f"{g['onnxruntime']['gflops']:.1f} GFLOP/s; the floor uses {r['floor_gflops']:.1f} GFLOP/s. "
        "Unet FLOPs are the manifest's (2 x multiply-adds of one call at batch 1) x 2 rows; times are "
        "medians.",
        "",
    ]
    rows = []
    for u in r["unets"]:
        if "skipped" in u:
            rows.append([u["unet"], "skipped", "", "", "", ""])
        else:
            rows.append(
                [
                    u["unet"],
                    u["flops_per_call_batch1"] / 1e9,
                    u["median_s"] * 1e3,
                    u["floor_s"] * 1e3,
                    u["achieved_gflops"],
                    f"{u['percent_of_gemm']:.1f}%",
                ]
            )
    lines += table(["Unet, batch 2", "GFLOP / call (batch 1)", "engine ms", "floor ms", "GFLOP/s", "% of GEMM"], rows)
    return lines + (_session_variants(r) if r["session_variants"] else [])


def _outside_engine(r: dict) -> list[str]:
    c = r["config"]
    lines = [
        "### 3. Time outside engine calls",
        "",
        f"One request of {c['batch']} images, {c['sampler']} {c['steps']} steps, sr_strength "
        f"{c.get('sr_strength', 1.0)}, {c['threads']} threads, "
        f"PNG encoding included; {r['engine_calls']} engine calls.",
        "",
    ]
    return lines + table(
        ["part", "s", "% of total"],
        [[k, p["seconds"], f"{p['percent']:.2f}%"] for k, p in r["parts"].items()]
        + [["total", r["total_s"], "100%"], ["outside engine calls", r["outside_s"], f"{r['outside_percent']:.2f}%"]],
    )


def _steps_vs_quality(r: dict) -> list[str]:
    c = r["config"]
    seeds = c.get("seeds", [c.get("seed", 0)])
    lines = [
        "### 4. Steps vs quality",
        "",
        f"`imagen-eval` on {c['n']} `{c['split']}` captions at each of the seeds {seeds} "
        f"({c['n'] * len(seeds)} images per row), batch {c['batch']}, {c['threads']} threads; the schedule has "
        f"{c['timesteps']} timesteps. Every row uses the bundle's sr_strength ({c.get('sr_strength', 1.0)}): the "
        "super-resolution Unet runs that share of its steps. Rows of one step count make the same Unet calls. "
        "The interval is the exact-match rate's 95% Wilson interval; the target's interval is the difference's "
        "(Newcombe's, from the two Wilson intervals).",
        "",
    ]
    return lines + table(
        ["sampler", "steps / Unet", "Unet calls", "exact match", "95% interval", "per seed", "images / s"],
        [
            [
                row["config"],
                f"{row['steps']}{' (capped)' if row['capped'] else ''}",
                row.get("unet_calls", ""),
                f"{100 * row['exact']:.1f}%",
                "-".join(f"{100 * v:.0f}%" for v in row.get("interval", [])),
                ", ".join(f"{100 * v:.1f}" for v in row.get("exact_per_seed", [])),
                row["images_per_second"],
            ]
            for row in r["rows"]
        ],
    )


def _memory(r: dict) -> list[str]:
    lines = [
        "### 5. Peak memory and cold start",
        "",
        f"Fresh processes, {r['config']['threads']} threads; cold start = `import imagen.runtime` + "
        f"`Pipeline.load` (median of {r['config']['repeats']}; the first run "
        f"{r['cold_start_s']['first']:.3f} s); torch imported: {fmt(r['torch_imported'])}. Peak RSS is "
        f"the process's VmHWM after generating ({r['config']['generate']}).",
        "",
    ]
    return lines + table(
        ["measure", "value"],
        [
            ["import imagen.runtime (s)", r["import_s"]],
            ["Pipeline.load (s)", r["load_s"]],
            ["cold start, import + load (s)", r["cold_start_s"]["median"]],
            ["whole process incl. interpreter start (s)", r["process_wall_s"]],
            ["peak RSS, load + 1 image (MB)", r["peak_rss_mb_one_image"]],
            [f"peak RSS, load + {r['max_batch']} images (MB)", r["peak_rss_mb_max_batch"]],
        ],
    )


SECTION_RENDERERS = {
    "1": _reference_vs_runtime,
    "2": _engine_efficiency,
    "3": _outside_engine,
    "4": _steps_vs_quality,
    "5": _memory,
}


def render(results: dict) -> str:
    """The whole report of `results` (what `suite.run_suite` returns) as Markdown."""
    sections = results["sections"]
    lines = _header(results) + _summary(sections)
    for key, render_section in SECTION_RENDERERS.items():
        if key in sections:
            lines += render_section(sections[key])
    return "\n".join(lines).rstrip() + "\n"


def write_report(path: Path, text: str) -> None:
    """Replaces the text between the bench markers in `path` (creating the file if needed)."""
    path = Path(path)
    block = f"{START}\n{text.rstrip()}\n{END}"
    if path.exists():
        old = path.read_text()
        if START in old and END in old and old.index(START) < old.index(END):
            new = old[: old.index(START)] + block + old[old.index(END) + len(END) :]
        else:
            new = old.rstrip() + "\n\n" + block + "\n"
    else:
        new = (
            "# Benchmarks\n\nMeasured with `python -m bench` (bench/). The section between "
            "the markers is rewritten by each run with `--out`.\n\n" + block + "\n"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new)
