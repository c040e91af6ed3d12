"""One engine batch from many requests, over the runtime's public seams (no web imports).

`prepare` checks a request and tokenizes its prompt (on the event loop: cheap, and a bad request
fails before it queues). `run_batch` runs requests that share their settings as one batch:

    text_embeds = pipe.encode(ids, mask)
    text_embeds, text_mask = pipe.text_conditioning(text_embeds, mask, counts)  # row i repeated n_i times
    x = pipe.sample(text_embeds, text_mask, noise, settings)
    images = pipe.to_images(x)                           # uint8 on the host, as Pipeline.__call__

where `noise(shape)` stacks, request by request in batch order, each request's own draws
`Generator(PCG64(seed_i)).standard_normal((n_i, *shape[1:]), float32)`. Every draw the cascade makes
has the batch as its first axis (docs/bundle.md, Sampling), so request i gets exactly the numbers
`pipe(prompt_i, seed=seed_i, num_images_per_prompt=n_i)` draws alone, and its images equal its solo
images up to the engines' batch-dependent rounding (tests/test_serve.py measures it).
"""

import dataclasses
import io
import secrets
import time

import numpy as np

from imagen.runtime.contract import MAX_SEED, TEXT_ENCODER, Settings


@dataclasses.dataclass(frozen=True)
class ImageRequest:
    """A checked request: its prompt's tokens, `n` images, its seed and settings."""

    prompt: str
    n: int
    seed: int
    settings: Settings
    input_ids: np.ndarray  # (1, L) int64
    attention_mask: np.ndarray  # (1, L) int64
    revised_prompt: str | None  # the part of the prompt that fit, when it was truncated

    @property
    def key(self) -> Settings:
        """Requests with equal keys run in one batch: their settings without the seed."""
        return dataclasses.replace(self.settings, seed=None)


@dataclasses.dataclass
class Images:
    """One request's output: PNG bytes and one info dict per image."""

    pngs: list[bytes]
    info: list[dict]


def prepare(pipe, prompt: str, n: int = 1, *, seed=None, eta=None, **settings) -> ImageRequest:
    """A request checked against the bundle: ParameterError for settings (`steps`, `sampler`,
    `guidance_scale`, `sr_strength`, `eta`, `seed`), PromptError for the prompt. `n` is checked by
    the caller. A request without a seed gets one drawn here, and reported."""
    settings = pipe.settings(eta=0.0 if eta is None else eta, seed=seed, **settings)
    seed = secrets.randbelow(MAX_SEED) if settings.seed is None else settings.seed
    input_ids, attention_mask, truncated = pipe.tokenizer([prompt])
    revised = fitted_prompt(pipe.tokenizer, prompt) if truncated[0] else None
    return ImageRequest(prompt, n, seed, dataclasses.replace(settings, seed=seed), input_ids, attention_mask, revised)


def fitted_prompt(tokenizer, prompt: str) -> str:
    """The longest start of `prompt` whose tokens fit before eos (what the text encoder saw)."""
    limit = tokenizer.max_length - 1
    low, high = 0, len(prompt)  # bisection: token counts grow with the prefix
    while low < high:
        middle = (low + high + 1) // 2
        if len(tokenizer.ids(prompt[:middle])) <= limit:
            low = middle
        else:
            high = middle - 1
    return prompt[:low]


def batch_noise(requests: list[ImageRequest]):
    """`noise(shape)` for a batch: request i's own generator draws its n_i rows of every draw."""
    generators = [np.random.Generator(np.random.PCG64(request.seed)) for request in requests]
    counts = [request.n for request in requests]

    def noise(shape):
        if shape[0] != sum(counts):
            raise RuntimeError(f"a draw of shape {tuple(shape)} does not have the batch ({sum(counts)}) first")
        rows = [g.standard_normal((count, *shape[1:]), dtype=np.float32) for g, count in zip(generators, counts)]
        return np.concatenate(rows, axis=0)

    return noise


def run_batch(pipe, requests: list[ImageRequest]) -> list[Images]:
    """Images for `requests`, which share one key, as one engine batch of sum(n_i) <= pipe.max_batch images."""
    start = time.perf_counter()
    settings = requests[0].settings
    counts = [request.n for request in requests]
    input_ids = np.concatenate([request.input_ids for request in requests], axis=0)
    attention_mask = np.concatenate([request.attention_mask for request in requests], axis=0)
    timings = {"engine_calls": 1}
    text_embeds = pipe.encode(input_ids, attention_mask)
    timings["engine"] = timings[f"engine:{TEXT_ENCODER}"] = timings["text"] = time.perf_counter() - start
    text_embeds, text_mask = pipe.text_conditioning(text_embeds, attention_mask, counts)
    x = pipe.sample(text_embeds, text_mask, batch_noise(requests), settings, timings=timings)
    array = pipe.to_images(x)
    timings["batch"] = time.perf_counter() - start
    batch = {"images": int(array.shape[0]), "requests": len(requests)}
    results, row = [], 0
    for request in requests:
        info = [image_info(pipe, request, index, batch, timings) for index in range(request.n)]
        pngs = [encode_png(array[row + index], info[index]) for index in range(request.n)]
        results.append(Images(pngs, info))
        row += request.n
    return results


def image_info(pipe, request: ImageRequest, index: int, batch: dict, timings: dict) -> dict:
    return {
        "index": index,
        "prompt": request.prompt,
        "seed": request.seed,
        **request.settings.to_info(),
        "truncated": request.revised_prompt is not None,
        "bundle_sha": pipe.bundle.short_sha,
        "backend": pipe.backend_name,
        "batch": dict(batch),
        "timings": {key: value for key, value in timings.items() if key != "engine_calls"},
        "engine_calls": timings.get("engine_calls", 0),
    }


def encode_png(image: np.ndarray, info: dict) -> bytes:
    """PNG bytes with the settings that reproduce the image as text chunks (as imagen-run writes them)."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    metadata = PngInfo()
    for key in ("prompt", "seed", "sampler", "steps", "sr_strength", "guidance_scale", "bundle_sha"):
        metadata.add_text(key, str(info[key]))
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="PNG", pnginfo=metadata)
    return buffer.getvalue()
