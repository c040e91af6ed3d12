"""Section 4: prompt adherence (`imagen-eval`'s exact-match rate, with its 95% interval) and speed
of every sampler at equal Unet calls, over n captions at each of two seeds. Target: the best
sampler at 25 steps per Unet within 1 point of ancestral DDPM over every timestep."""

import math

from .workload import load_pipeline, resolve_settings, unet_stages, warm

TARGET_POINTS = 1.0
FEW_STEPS = (25, 10)
# (label, sampler, steps); steps None is every timestep of the schedule. Every sampler at each of
# FEW_STEPS, so rows of one step count cost the same Unet calls.
QUALITY_CONFIGS = [("DDPM, all timesteps", "ddpm", None)] + [
    (f"{label} {steps}", sampler, steps)
    for steps in FEW_STEPS
    for label, sampler in (
        ("DDPM", "ddpm"),
        ("Euler ancestral", "euler_a"),
        ("DPM-Solver++(2M) SDE", "dpmpp_2m_sde"),
        ("DPM-Solver++(2M)", "dpmpp_2m"),
        ("DDIM", "ddim"),
    )
]
# The second seed is far from the first: image i of a run with seed s uses seed s + i.
SEED_STRIDE = 10_000


Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The 95% Wilson score interval of a binomial proportion."""
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def newcombe(hits_a: int, n_a: int, hits_b: int, n_b: int) -> tuple[float, float]:
    """The 95% interval of the difference of two independent proportions, a - b (Newcombe's method 10:
    the two Wilson intervals combined)."""
    p_a, p_b = hits_a / n_a, hits_b / n_b
    (low_a, high_a), (low_b, high_b) = wilson(hits_a, n_a), wilson(hits_b, n_b)
    d = p_a - p_b
    return d - math.hypot(p_a - low_a, high_b - p_b), d + math.hypot(high_a - p_a, p_b - low_b)


def steps_vs_quality(
    bundle, *, threads: int, n: int = 96, batch: int = 8, split: str = "train", seed: int = 0, seeds: int = 2
) -> dict:
    """One `imagen-eval` report per QUALITY_CONFIGS row and seed, on the same captions (steps beyond
    the schedule's timesteps are capped to it); every row at the bundle's sr_strength."""
    from imagen.shapes.evaluate import evaluate

    pipe = load_pipeline(bundle, threads)
    batch = min(batch, pipe.bundle.max_batch)
    total = min(pipe.bundle.schedules[name].num_timesteps for name, _ in unet_stages(pipe.bundle))
    sr_strength = resolve_settings(pipe, seed=seed).sr_strength
    used_seeds = [seed + k * SEED_STRIDE for k in range(seeds)]
    warm(pipe, seed)
    rows = []
    for label, sampler, steps in QUALITY_CONFIGS:
        # Explicit steps: None would mean the bundle's default steps, not every timestep.
        used = total if steps is None else min(steps, total)
        hits, seconds, accuracy, per_seed = 0, 0.0, {}, []
        for s in used_seeds:
            report = evaluate(pipe, split, n, batch_size=batch, seed=s, sampler=sampler, steps=used)
            per_seed.append(round(report["accuracy"]["exact"] * n))
            hits += per_seed[-1]
            seconds += n / report["images_per_second"]
            for key, value in report["accuracy"].items():
                if key != "exact":
                    accuracy[key] = accuracy.get(key, 0.0) + value / len(used_seeds)
        settings = pipe.settings(sampler=sampler, steps=used)
        count = n * len(used_seeds)
        rows.append(
            {
                "config": label,
                "sampler": sampler,
                "steps": used,
                "unet_calls": sum(pipe.model_calls(settings)),
                "capped": steps is not None and steps > total,
                "exact": hits / count,
                "hits": hits,
                "n": count,
                "exact_per_seed": [h / n for h in per_seed],
                "interval": list(wilson(hits, count)),
                "accuracy": accuracy,
                "images_per_second": count / seconds,
            }
        )
    best = max(
        (r for r in rows if r["steps"] == min(25, total) and r["config"] != QUALITY_CONFIGS[0][0]),
        key=lambda r: r["exact"],
    )
    gap = 100 * (rows[0]["exact"] - best["exact"])
    low, high = newcombe(rows[0]["hits"], rows[0]["n"], best["hits"], best["n"])
    return {
        "config": {
            "n": n,
            "seeds": used_seeds,
            "batch": batch,
            "split": split,
            "threads": threads,
            "timesteps": total,
            "sr_strength": sr_strength,
        },
        "rows": rows,
        "target": {
            "what": f"best sampler at 25 steps ({best['config']}), exact-match points below full DDPM",
            "value": gap,
            "unit": " points",
            "goal": f"<= {TARGET_POINTS:.0f} point",
            "met": gap <= TARGET_POINTS,
            "interval": [100 * low, 100 * high],
        },
    }
