"""What a request is and what it gets back: `Request` (prompts, image count, its own noise),
`Result` (uint8 images and one info per image), the batch's noise (`batch_noise`) and an image's
info (`image_info`). `Pipeline.generate` (runtime/pipeline.py) runs a list of requests as one batch.
"""

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .contract.settings import Settings


@dataclass(frozen=True)
class Request:
    """One request of a batch: `prompts` (a str or a list), `n` images of each prompt, and its own
    noise: a `seed` (None: one is drawn, and reported in the info) or a NumPy `generator`.
    `negative_prompt` (one for all its prompts) makes the unconditional rows of bundles that take
    them from a negative prompt (DeepFloyd IF; None: the empty prompt)."""

    prompts: str | Sequence[str]
    n: int = 1
    seed: int | None = None
    generator: np.random.Generator | None = None
    negative_prompt: str | None = None

    @property
    def prompt_list(self) -> list[str]:
        return [self.prompts] if isinstance(self.prompts, str) else list(self.prompts)

    @property
    def images(self) -> int:
        """Its rows of the batch: every prompt n times, prompt by prompt."""
        return len(self.prompt_list) * self.n


@dataclass
class Result:
    """Images of one request: `array` (uint8 (N, s, s, 3)), `images` (PIL, made on first use) and
    `info` (one dict per image, `image_info`)."""

    array: np.ndarray
    info: list[dict]

    @functools.cached_property
    def images(self) -> list:
        from PIL import Image

        return [Image.fromarray(np.ascontiguousarray(image)) for image in self.array]

    def __len__(self) -> int:
        return int(self.array.shape[0])


def batch_noise(generators: Sequence[np.random.Generator], rows: Sequence[int]) -> Callable:
    """`noise(shape)` for a batch: generator i draws its rows[i] rows of every draw, stacked in order
    (one generator draws the whole batch, as a request alone does)."""
    total = sum(rows)

    def noise(shape):
        if shape[0] != total:
            raise RuntimeError(f"a draw of shape {tuple(shape)} does not have the batch ({total}) first")
        if len(generators) == 1:
            return generators[0].standard_normal(tuple(shape), dtype=np.float32)
        draws = [g.standard_normal((count, *shape[1:]), dtype=np.float32) for g, count in zip(generators, rows)]
        return np.concatenate(draws, axis=0)

    return noise


def image_info(
    pipe,
    prompt: str,
    index: int,
    seed,
    settings: Settings,
    truncated: bool,
    batch: dict,
    timings: dict,
    negative_prompt: str | None = None,
):
    """What one image's info says (`Result.info`, imagen-serve's `data[i].imagen`, the PNG text chunks
    take theirs from it): its request's prompt, negative prompt (only when the request gave one) and
    seed, the settings, the bundle, the engine and the Unets' inference precision ("fp32", "bf16", or an
    FP16 bundle's "fp16"), the batch it ran in (images and requests) and the batch's timings (seconds;
    `engine_calls` counts backend calls)."""
    negative = {} if negative_prompt is None else {"negative_prompt": negative_prompt}
    return {
        "index": index,
        "prompt": prompt,
        **negative,
        "seed": seed,
        **settings.to_info(),
        "truncated": truncated,
        "bundle_sha": pipe.bundle.short_sha,
        "backend": pipe.backend_name,
        "precision": pipe.precision,
        "batch": dict(batch),
        "timings": dict(timings),
    }
