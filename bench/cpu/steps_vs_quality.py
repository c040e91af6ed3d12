"""Section 4: prompt adherence (`imagen-eval`'s exact-match rate) and speed per sampler and
step count. Target: DPM-Solver++ at 25 steps within 2 points of DDPM over every timestep."""

from .workload import load_pipeline, resolve_settings, unet_stages, warm

TARGET_POINTS = 2.0
# (label, sampler, steps); steps None is every timestep of the schedule.
QUALITY_CONFIGS = [
    ("DDPM, all timesteps", "ddpm", None),
    ("DDIM 50", "ddim", 50),
    ("DDIM 25", "ddim", 25),
    ("DPM-Solver++ 25", "dpmpp_2m", 25),
    ("DPM-Solver++ 15", "dpmpp_2m", 15),
    ("DPM-Solver++ 10", "dpmpp_2m", 10),
]


def steps_vs_quality(bundle, *, threads: int, n: int = 48, batch: int = 8, split: str = "train", seed: int = 0) -> dict:
    """One `imagen-eval` report per QUALITY_CONFIGS row, on the same n captions and seeds (steps
    beyond the schedule's timesteps are capped to it); every row at the bundle's sr_strength."""
    from imagen.shapes.evaluate import evaluate

    pipe = load_pipeline(bundle, threads)
    batch = min(batch, pipe.bundle.max_batch)
    total = min(pipe.bundle.schedules[name].num_timesteps for name, _ in unet_stages(pipe.bundle))
    sr_strength = resolve_settings(pipe, seed=seed).sr_strength
    warm(pipe, seed)
    rows = []
    for label, sampler, steps in QUALITY_CONFIGS:
        # Explicit steps: None would mean the bundle's default steps, not every timestep.
        used = total if steps is None else min(steps, total)
        report = evaluate(pipe, split, n, batch_size=batch, seed=seed, sampler=sampler, steps=used)
        rows.append(
            {
                "config": label,
                "sampler": sampler,
                "steps": used,
                "capped": steps is not None and steps > total,
                "exact": report["accuracy"]["exact"],
                "accuracy": {k: v for k, v in report["accuracy"].items() if k != "exact"},
                "images_per_second": report["images_per_second"],
            }
        )
    gap = 100 * (rows[0]["exact"] - next(r for r in rows if r["config"] == "DPM-Solver++ 25")["exact"])
    return {
        "config": {
            "n": n,
            "batch": batch,
            "split": split,
            "seed": seed,
            "threads": threads,
            "timesteps": total,
            "sr_strength": sr_strength,
        },
        "rows": rows,
        "target": {
            "what": "DPM-Solver++ 25 exact-match, points below full DDPM",
            "value": gap,
            "unit": " points",
            "goal": f"<= {TARGET_POINTS:.0f} points",
            "met": gap <= TARGET_POINTS,
        },
    }
