"""Prompt adherence of a bundle on `shapes` captions: generate, analyse, count."""

import textwrap
import time
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw

from .analyse import analyse, background_error, score
from .scenes import ATTRIBUTES, captions


def evaluate(
    pipeline,
    split: str = "train",
    n: int = 100,
    *,
    batch_size: int = 8,
    seed: int = 0,
    sampler: str | None = None,
    steps: int | None = None,
    guidance_scale: float | None = None,
    sr_strength: float | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Accuracy per attribute and the exact-match rate over n captions of `split`, and the mean
    `background_error` (how far the backgrounds are from the training images' plain one).

    Image i is made with seed `seed + i` (batched `batch_size` at a time, each batch with
    its first image's seed), so a report is reproducible on the same bundle and machine.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    scenes = captions(split, n)
    rows, images = [], []
    start = time.perf_counter()
    generating = 0.0
    for first in range(0, n, batch_size):
        chunk = scenes[first : first + batch_size]
        t0 = time.perf_counter()
        result = pipeline(
            [s.caption for s in chunk],
            seed=seed + first,
            sampler=sampler,
            steps=steps,
            guidance_scale=guidance_scale,
            sr_strength=sr_strength,
        )
        generating += time.perf_counter() - t0
        for scene, image in zip(chunk, result.images):
            objects = analyse(image)
            rows.append(
                {
                    "caption": scene.caption,
                    "expected": scene.labels(),
                    "found": objects[0].labels() if objects else None,
                    **score(scene.labels(), objects),
                    "background": background_error(image),
                }
            )
            images.append(image)
        if progress:
            progress(len(chunk))
    accuracy = {name: float(np.mean([r[name] for r in rows])) for name in (*ATTRIBUTES, "exact")}
    info = getattr(result, "info", None)  # a Pipeline's Result says which settings it used
    settings = {key: info[0][key] for key in ("sampler", "steps", "guidance_scale", "sr_strength")} if info else None
    return {
        "split": split,
        "n": n,
        "settings": settings,
        "accuracy": accuracy,
        "background_error": float(np.mean([r["background"] for r in rows])),
        "images_per_second": n / generating,
        "seconds": time.perf_counter() - start,
        "rows": rows,
        "images": images,
    }


def make_grid(images: list[Image.Image], labels: list[str], columns: int = 4, scale: int = 2) -> Image.Image:
    """Images in a grid, each enlarged `scale` times (nearest) with its label underneath."""
    if not images:
        raise ValueError("no images to put in a grid")
    side = images[0].width * scale
    label_height = 24
    rows = (len(images) + columns - 1) // columns
    cell_w = max(side, 150)
    grid = Image.new("RGB", (columns * cell_w, rows * (side + label_height)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, (image, label) in enumerate(zip(images, labels)):
        x, y = (i % columns) * cell_w, (i // columns) * (side + label_height)
        grid.paste(image.resize((side, side), Image.NEAREST), (x + (cell_w - side) // 2, y))
        lines = textwrap.wrap(label, width=cell_w // 6)[:2]
        draw.multiline_text((x + 4, y + side + 1), "\n".join(lines), fill=(0, 0, 0), spacing=1)
    return grid


def format_report(report: dict) -> str:
    acc = report["accuracy"]
    cells = "  ".join(f"{name} {acc[name] * 100:5.1f}%" for name in (*ATTRIBUTES, "exact"))
    settings = report.get("settings")
    line = (
        f"{report['split']:8s} n={report['n']:<5d} {cells}  background {report['background_error']:.1f}  "
        f"{report['images_per_second']:.2f} images/s"
    )
    if settings:
        line += (
            f"  ({settings['sampler']}, steps {settings['steps']}, guidance {settings['guidance_scale']}, "
            f"sr_strength {settings['sr_strength']})"
        )
    return line
