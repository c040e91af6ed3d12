"""Why a sampler loses prompt adherence: one factor changed at a time, at equal Unet calls.

Every row runs `imagen-eval` on the same captions and seeds with the bundle's steps per Unet and
sr_strength, and changes one thing against DPM-Solver++(2M) at the bundle's defaults: the
thresholding of the data prediction (dynamic at the bundle's percentile, static clip to [-1, 1],
none), the guidance scale, the timestep spacing (linspace, as the runtime spaces them; trailing,
which starts at T - 1 and never reaches 0), or the sampler of one stage only (the base Unet's or
the super-resolution Unet's). Factors that are not request settings are swapped in for the row
by replacing one runtime function (`guidance.dynamic_threshold`, `bundle.spaced_timesteps`,
`pipeline.run_sampler`) and put back after it; nothing else differs.

    python -m bench.cpu.sampler_study [--bundle DIR] [--n 96] [--heldout-n 48] [--seeds 0 1]
"""

import argparse
import contextlib
import json
import time

import numpy as np

from ..machine import machine
from .steps_vs_quality import wilson
from .workload import load_pipeline

DEFAULT = ("dpmpp_2m", {})
# label -> (sampler, changes); changes: threshold ("dynamic", "static", "none"), guidance_scale,
# spacing ("linspace", "trailing"), base_sampler / sr_sampler (one stage's sampler), steps (per Unet,
# "all" for every timestep; the rows of the study keep the bundle's, the defaults' candidates do not)
STUDY = {
    "DPM-Solver++(2M), the bundle's defaults": DEFAULT,
    "thresholding: static clip to [-1, 1]": ("dpmpp_2m", {"threshold": "static"}),
    "thresholding: none": ("dpmpp_2m", {"threshold": "none"}),
    "guidance 1 (none)": ("dpmpp_2m", {"guidance_scale": 1.0}),
    "guidance 5": ("dpmpp_2m", {"guidance_scale": 5.0}),
    "spacing: trailing": ("dpmpp_2m", {"spacing": "trailing"}),
    "base Unet DDPM, super-resolution DPM-Solver++": ("dpmpp_2m", {"base_sampler": "ddpm"}),
    "base Unet DPM-Solver++, super-resolution DDPM": ("dpmpp_2m", {"sr_sampler": "ddpm"}),
    "DDIM": ("ddim", {}),
    "DDPM (ancestral)": ("ddpm", {}),
    "DPM-Solver++(2M) SDE": ("dpmpp_2m_sde", {}),
    "Euler ancestral": ("euler_a", {}),
    "DDPM, every timestep": ("ddpm", {"steps": "all"}),
    "DDPM 25": ("ddpm", {"steps": 25}),
    "DDPM 20": ("ddpm", {"steps": 20}),
    "DDPM 15": ("ddpm", {"steps": 15}),
    "DDPM 10": ("ddpm", {"steps": 10}),
    "DDPM 8": ("ddpm", {"steps": 8}),
    "DDPM 6": ("ddpm", {"steps": 6}),
}


@contextlib.contextmanager
def swapped(changes: dict, base_size: int):
    """The runtime with this row's non-request factors swapped in, restored on the way out."""
    from imagen.runtime import bundle, guidance, pipeline

    saved = (guidance.dynamic_threshold, bundle.spaced_timesteps, pipeline.run_sampler)
    threshold = changes.get("threshold", "dynamic")
    if threshold == "static":
        guidance.dynamic_threshold = lambda x0, *_: np.clip(x0, -1.0, 1.0)
    elif threshold == "none":
        guidance.dynamic_threshold = lambda x0, *_: x0
    if changes.get("spacing") == "trailing":
        space = saved[1]

        def trailing(total, steps, strength=1.0, spacing="linspace", offset=0):
            return space(total, steps, strength, "trailing", offset)

        bundle.spaced_timesteps = trailing
    if "base_sampler" in changes or "sr_sampler" in changes:
        run = saved[2]

        def per_stage(name, denoise, x, *args):
            key = "base_sampler" if x.shape[-1] == base_size else "sr_sampler"
            return run(changes.get(key, name), denoise, x, *args)

        pipeline.run_sampler = per_stage
    try:
        yield
    finally:
        guidance.dynamic_threshold, bundle.spaced_timesteps, pipeline.run_sampler = saved


def exact_matches(pipe, split: str, n: int, seeds, sampler: str, guidance_scale, steps) -> tuple[int, float]:
    """Exact matches over n captions at each seed, and the mean background error."""
    from imagen.shapes.evaluate import evaluate

    batch = min(8, pipe.bundle.max_batch)
    total, background = 0, 0.0
    for seed in seeds:
        report = evaluate(
            pipe, split, n, batch_size=batch, seed=seed, sampler=sampler, guidance_scale=guidance_scale, steps=steps
        )
        total += round(report["accuracy"]["exact"] * n)
        background += report["background_error"] / len(seeds)
    return total, background


def study(bundle=None, *, threads: int = 2, n: int = 96, heldout_n: int = 48, seeds=(0,), rows=None) -> dict:
    pipe = load_pipeline(bundle, threads)
    settings = pipe.settings()
    base_size = pipe.bundle.manifest.image_sizes[0]
    results = []
    for label in rows or STUDY:
        sampler, changes = STUDY[label]
        start = time.perf_counter()
        steps = changes.get("steps")
        steps = min(pipe.bundle.timesteps) if steps == "all" else steps
        with swapped(changes, base_size):
            row = {"row": label, "sampler": sampler, **changes}
            for split, count in (("train", n), ("heldout", heldout_n)):
                if count == 0:
                    continue
                hits, background = exact_matches(
                    pipe, split, count, seeds, sampler, changes.get("guidance_scale"), steps
                )
                total = count * len(seeds)
                row[split] = {
                    "exact": hits / total,
                    "n": total,
                    "interval": wilson(hits, total),
                    "background_error": background,
                }
        row["seconds"] = time.perf_counter() - start
        results.append(row)
        print(json.dumps(row), flush=True)
    return {
        "machine": machine(),
        "steps": list(settings.steps),
        "unet_calls": pipe.model_calls(settings),
        "sr_strength": settings.sr_strength,
        "guidance_scale": settings.guidance_scale,
        "seeds": list(seeds),
        "rows": results,
    }


def markdown(report: dict) -> str:
    calls = " + ".join(map(str, report["unet_calls"]))
    lines = [
        f"{report['machine']['cpu']}, {report['machine']['date']}, threads 2; steps {report['steps']} per Unet "
        f"({calls} Unet calls), sr_strength {report['sr_strength']}, guidance {report['guidance_scale']} "
        f"unless the row says otherwise; seeds {report['seeds']}.",
        "",
        "| row | train exact (95% CI), background error | held-out exact (95% CI), background error |",
        "|---|---|---|",
    ]
    for row in report["rows"]:
        cells = []
        for split in ("train", "heldout"):
            r = row.get(split)
            if r is None:
                cells.append("-")
                continue
            low, high = r["interval"]
            cells.append(
                f"{100 * r['exact']:.1f}% ({100 * low:.0f}-{100 * high:.0f}), n={r['n']}, {r['background_error']:.2f}"
            )
        lines.append(f"| {row['row']} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu.sampler_study", description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", default=None, help="bundle folder (default: the embedded demo)")
    parser.add_argument("--n", type=int, default=96, help="training captions per seed (0: none)")
    parser.add_argument("--heldout-n", type=int, default=48, help="held-out captions per seed (0: none)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", nargs="+", default=None, help="labels of STUDY to run (default: all)")
    parser.add_argument("--json", default=None, help="also write the report here")
    args = parser.parse_args(argv)
    report = study(
        args.bundle, threads=args.threads, n=args.n, heldout_n=args.heldout_n, seeds=args.seeds, rows=args.rows
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    print(markdown(report))


if __name__ == "__main__":
    main()
