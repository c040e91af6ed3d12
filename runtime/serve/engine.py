"""One engine batch from many requests, over the runtime's public API (no web imports).

`prepare` checks a request and tokenizes its prompt (on the event loop: cheap, and a bad request
fails before it queues). `run_batch` runs requests that share their settings as one
`Pipeline.generate` call, the request flow `Pipeline.__call__` and imagen-run go through too, and
encodes each image as a PNG with its settings (`encode_png`, as imagen-run writes them). Request
i's noise is its own generator's, `Generator(PCG64(seed_i))`, drawing its n_i rows of every draw,
and its negative prompt is its own (`Request.negative_prompt`, not part of the batch key), so its
images equal `pipe(prompt_i, seed=seed_i, num_images_per_prompt=n_i, negative_prompt=...)` up to
the engines' batch-dependent rounding (tests/test_serve_demo.py and tests/test_negative_prompt.py
measure it).
"""

import dataclasses
import secrets

from imagen.runtime import ParameterError, PromptError, Request, Settings, encode_png
from imagen.runtime.contract import MAX_SEED


@dataclasses.dataclass(frozen=True)
class ImageRequest:
    """A checked request: the pipeline's `Request` (one prompt, n images, its seed, its negative
    prompt), the settings it runs with (without the seed), and the part of its prompt that fit, when
    it was truncated."""

    request: Request
    settings: Settings
    revised_prompt: str | None

    @property
    def key(self) -> Settings:
        """Requests with equal keys may share an engine batch (`batching.next_batch`): the settings, which
        `Pipeline.generate` takes once per batch; seeds and negative prompts are per request."""
        return self.settings

    @property
    def images(self) -> int:
        return self.request.images


@dataclasses.dataclass
class Images:
    """One request's output: PNG bytes and one info dict per image."""

    pngs: list[bytes]
    info: list[dict]


def prepare(pipe, prompt: str, n: int = 1, *, seed=None, eta=None, negative_prompt=None, **settings) -> ImageRequest:
    """A request checked against the bundle: ParameterError for settings (`steps`, `sampler`,
    `guidance_scale`, `sr_strength`, `eta`, `seed`) and for `negative_prompt`, PromptError for the
    prompt. `n` is checked by the caller. A request without a seed gets one drawn here, and reported."""
    settings = pipe.settings(eta=0.0 if eta is None else eta, seed=seed, **settings)
    seed = secrets.randbelow(MAX_SEED) if settings.seed is None else settings.seed
    _, _, truncated = pipe.tokenizer([prompt])
    check_negative_prompt(pipe, negative_prompt)
    revised = fitted_prompt(pipe.tokenizer, prompt) if truncated[0] else None
    request = Request(prompt, n, seed, negative_prompt=negative_prompt)
    return ImageRequest(request, dataclasses.replace(settings, seed=None), revised)


def check_negative_prompt(pipe, negative_prompt) -> None:
    """ParameterError naming `negative_prompt` where the bundle takes none (a learned null text makes its
    unconditional rows) or where the tokenizer refuses the text as given (the rule for prompts: control
    characters, lone surrogates; "" is the empty prompt), before the request can reach a batch."""
    if negative_prompt is None:
        return
    if not pipe.negative_prompts:
        raise ParameterError(
            "negative_prompt",
            "left out (or null) for this bundle: it uses a learned null text for guidance's unconditional "
            "rows, not a negative prompt (bundles exported from DeepFloyd IF take one)",
            negative_prompt,
        )
    try:
        pipe.tokenizer([negative_prompt], allow_empty=True)
    except PromptError as error:
        reason = str(error).removeprefix("prompt 0 ")
        raise ParameterError("negative_prompt", f"text the tokenizer takes, but it {reason}", negative_prompt) from None


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


def run_batch(pipe, requests: list[ImageRequest]) -> list[Images]:
    """Images for `requests`, which share one key, as one engine batch of at most pipe.max_batch images."""
    settings = requests[0].settings
    if any(request.settings != settings for request in requests):
        raise ValueError("the requests of one engine batch must share their settings (batching.next_batch)")
    results = pipe.generate([request.request for request in requests], settings)
    return [
        Images([encode_png(image, info) for image, info in zip(result.array, result.info, strict=True)], result.info)
        for result in results
    ]
