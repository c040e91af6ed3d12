"""The text-to-image pipeline over a bundle (docs/bundle.md, Sampling).

    from imagen.runtime import Pipeline, Request
    with Pipeline.load("bundle/") as pipe:
        result = pipe("a red circle", steps=20, seed=0)
        result.images[0].save("out.png")
        red, blue = pipe.generate([Request("a red circle", n=2, seed=1), Request("a blue square", seed=2)],
                                  pipe.settings(steps=20))

`generate` is the one request flow: requests that share one `Settings`, each with its own prompts,
image count and seed, run as one engine batch. `__call__` is a batch of one request; imagen-run
calls it, imagen-serve and the Ray app gather concurrent requests into one `generate`. A request's
noise is its own: its generator draws its rows of every draw of the cascade (each draw has the
batch as its first axis, docs/bundle.md), so its images are the ones it makes alone, up to the
engines' batch-dependent rounding.

Quiet: the library prints nothing; pass `callback(stage_index, step_index, t, x)` to follow
progress (the CLI draws progress bars with it). A pipeline keeps no state between requests, so one
pipeline serves several threads and a failed request leaves it usable. `close()` (or the `with`
block) releases the engines; a closed pipeline refuses requests with a BackendError.

The loop runs in the array namespace of the Unet backends (`array_namespace`, runtime/arrays.py):
NumPy with ONNX Runtime on the CPU, CuPy with backends that keep their arrays on a GPU. Tokens
and noise (drawn on the host, so a seed makes the same image on every backend) go there once;
only the final images come back.
"""

import secrets
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from .arrays import backend_device, backend_namespace, device, namespace, to_namespace, to_numpy
from .backends import SplitBackend, check_backend_options, close_backends, open_engines
from .bundle import Bundle, check_settings_fit, load_bundle
from .continuous import sample_table_stage
from .contract import LOWRES, MANIFEST, TEXT_ENCODER
from .contract.settings import MAX_SEED, Settings, check_seed, is_int
from .errors import BackendError, BundleError, NonFiniteError, ParameterError, PromptError
from .guidance import GuidedDenoiser
from .images import resize_image, to_uint8
from .requests import Request, Result, batch_noise, image_info
from .samplers import run_sampler
from .tokenizer import Tokenizer, validate_prompt

DEMO_BUNDLE = Path(__file__).parent / "demo"


class Pipeline:
    def __init__(
        self, bundle: Bundle, backends: dict, tokenizer: Tokenizer | None = None, backend_name: str = "", choice=None
    ):
        self.bundle = bundle
        self.backends = backends
        self.tokenizer = tokenizer or Tokenizer.from_bundle(bundle)
        self.backend_name = backend_name
        self.choice = choice  # the backends.Choice that opened them (engine, precision, why); None: the caller did
        self.precision = choice.precision if choice else bundle.unets[0].precision  # the Unets'
        self.max_batch = bundle.max_batch
        self.num_unets = len(bundle.unets)
        namespaces = {backend_namespace(backends[stage.name]) for stage in bundle.unets}
        if len(namespaces) != 1:
            raise BackendError("the Unet backends keep their arrays in different namespaces; open them alike")
        self.xp = namespaces.pop()
        self.device = backend_device(backends[bundle.unets[0].name])
        self.closed = False

    @classmethod
    def load(
        cls, path=None, backend: str = "auto", providers=None, threads: int | None = None, precision: str = "fp32"
    ) -> "Pipeline":
        """Verifies the bundle at `path` (the built-in demo bundle when None), then opens one backend per
        stage (`open_engines`: "auto", "onnxruntime", "tensorrt" or "openvino"; `precision` "fp32", the
        exact path, "bf16" or "auto": OpenVINO's bf16 Unets where they pay, docs/cpu-backends.md)."""
        check_backend_options(backend, threads, precision)
        if path is None:
            if not (DEMO_BUNDLE / MANIFEST).is_file():
                raise BundleError("no built-in demo bundle in this install; pass --bundle PATH / Pipeline.load(path)")
            path = DEMO_BUNDLE
        bundle = load_bundle(path)
        tokenizer = Tokenizer.from_bundle(bundle)
        backends, choice = open_engines(bundle, backend, providers, threads, precision)
        return cls(bundle, backends, tokenizer, choice.backend, choice)

    def close(self) -> None:
        """Releases the engines (a backend's own `close`, where it has one, frees its device memory;
        ONNX Runtime sessions go with the last reference). Call it when no request runs; later
        requests raise BackendError. Closing twice does nothing."""
        backends, self.backends, self.closed = self.backends, {}, True
        close_backends(backends)

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _check_open(self) -> None:
        if self.closed:
            raise BackendError("this pipeline was closed (Pipeline.close); load the bundle again with Pipeline.load")

    def settings(
        self, *, steps=None, sampler=None, guidance_scale=None, eta=0.0, sr_strength=None, seed=None
    ) -> Settings:
        """The bundle's default settings with these values (None: the default), checked."""
        settings = self.bundle.default_settings.replace(
            self.bundle.timesteps,
            steps=steps,
            sampler=sampler,
            guidance_scale=guidance_scale,
            eta=eta,
            sr_strength=sr_strength,
            seed=seed,
        )
        check_settings_fit(self.bundle.manifest, settings)
        return settings

    def timesteps(self, settings: Settings) -> list[list[int]]:
        """The timesteps each Unet walks (`Bundle.walked_timesteps`)."""
        return self.bundle.walked_timesteps(settings)

    @property
    def warmup_steps(self) -> tuple[int, ...]:
        """The fewest steps per Unet a request may take that still runs every engine (a warm-up's): 1;
        for a Unet split by timestep (`SplitBackend`), the fewest whose timesteps fall on both sides
        of its switch; all of a stage's per-step table, whose steps are fixed (imagen-pytorch's)."""
        steps = []
        for stage, total in zip(self.bundle.unets, self.bundle.timesteps, strict=True):
            backend, fixed = self.backends[stage.name], stage.how_sampled.steps
            split = isinstance(backend, SplitBackend)
            steps.append(fixed or (backend.fewest_steps(total, stage.how_sampled) if split else 1))
        return tuple(steps)

    def model_calls(self, settings: Settings) -> list[int]:
        """Unet calls per stage for these settings (what a progress bar counts to). Heun's method calls
        the Unet twice a step, but once on the last (to sigma 0)."""
        pairs = zip(self.bundle.unets, self.timesteps(settings), strict=True)
        return [2 * len(t) - 1 if stage.how_sampled.time == "karras" else len(t) for stage, t in pairs]

    def _prompts(self, prompts, num_images: int, count_name: str = "num_images_per_prompt") -> list[str]:
        if isinstance(prompts, str):
            prompts = [prompts]
        elif isinstance(prompts, (list, tuple)):
            prompts = list(prompts)
        else:
            raise ParameterError("prompts", "a str or a list of str", type(prompts).__name__)
        if not is_int(num_images) or not 1 <= num_images <= self.max_batch:
            raise ParameterError(count_name, f"an integer in [1, {self.max_batch}]", num_images)
        total = len(prompts) * num_images
        if not 1 <= total <= self.max_batch:
            raise ParameterError(
                "prompts",
                f"1 to {self.max_batch} images per request (the bundle's max batch; prompts x {count_name})",
                f"{len(prompts)} x {num_images} = {total}",
            )
        return prompts

    def _check_requests(self, requests) -> None:
        if not isinstance(requests, (list, tuple)) or not requests:
            raise ParameterError("requests", "a non-empty list of Request", requests)
        for request in requests:
            if not isinstance(request, Request):
                raise ParameterError("requests", "a list of Request", type(request).__name__)
            self._prompts(request.prompts, request.n, "n")
            check_seed(request.seed)
            generator = request.generator
            if generator is not None and not isinstance(generator, np.random.Generator):
                raise ParameterError("generator", "a numpy.random.Generator or None", type(generator).__name__)
            if generator is not None and request.seed is not None:
                raise ParameterError("seed", "None when a generator is given", request.seed)
            self._check_negative_prompt(request.negative_prompt)
        total = sum(request.images for request in requests)
        if total > self.max_batch:
            raise ParameterError("requests", f"at most {self.max_batch} images in all (the bundle's max batch)", total)

    @property
    def negative_prompts(self) -> bool:
        """Whether the Unets take their unconditional rows from a negative prompt (else a learned null text)."""
        return self.bundle.unets[0].how_sampled.unconditional == "negative_prompt"

    def _check_negative_prompt(self, value) -> None:
        if value is None:
            return
        if not isinstance(value, str):
            raise ParameterError("negative_prompt", "a str or None", type(value).__name__)
        if not self.negative_prompts:
            raise ParameterError(
                "negative_prompt",
                "None for this bundle: its Unets take a learned null text, not a negative prompt's embedding "
                "(bundles exported from DeepFloyd IF take one)",
                value,
            )

    def _checked(self, settings: Settings | None) -> Settings:
        """`settings` checked against this bundle (None: its defaults); a batch's requests carry the seeds."""
        if settings is None:
            return self.settings()
        if not isinstance(settings, Settings):
            raise ParameterError("settings", "a Settings (Pipeline.settings(...)) or None", type(settings).__name__)
        values = {name: getattr(settings, name) for name in ("steps", "sampler", "guidance_scale", "eta")}
        return self.settings(**values, sr_strength=settings.sr_strength)

    def preprocess(self, prompts: list[str]) -> list[str]:
        """The prompts as the bundle's model reads them (DeepFloyd IF lower-cases and strips them, and
        cleans captions where the bundle says so; other bundles take them as given)."""
        mode = self.bundle.manifest.tokenizer.preprocess
        if mode == "none":
            return prompts
        from .captions import preprocess

        return preprocess(prompts, mode)

    def encode(self, input_ids: np.ndarray, attention_mask: np.ndarray):
        """Text embeddings (B, L, D) float32 for tokens (B, L) int64, in the encoder backend's namespace."""
        self._check_open()
        encoder = self.backends[TEXT_ENCODER]
        xp, where = backend_namespace(encoder), backend_device(encoder)
        feeds = {
            name: to_namespace(xp, tokens, device=where)
            for name, tokens in (("input_ids", input_ids), ("attention_mask", attention_mask))
        }
        embeds = encoder.run(feeds)["text_embeds"]
        if not bool(xp.all(xp.isfinite(embeds))):
            raise NonFiniteError(TEXT_ENCODER)
        return embeds

    def text_conditioning(self, text_embeds, attention_mask, repeats) -> tuple:
        """(text_embeds, text_mask) for the Unets, in the loop's namespace: row i of the encoder's
        output repeated `repeats[i]` times (an int: every row that many times), the mask as bool.
        The row index is built on the host and taken in the namespace (CuPy's `repeat` takes no
        array of counts)."""
        xp = self.xp
        text_embeds = to_namespace(xp, text_embeds, device=self.device)
        mask = to_namespace(xp, attention_mask, like=text_embeds)
        counts = [int(count) for count in repeats] if isinstance(repeats, (list, tuple)) else int(repeats)
        rows = to_namespace(xp, np.repeat(np.arange(text_embeds.shape[0], dtype=np.int64), counts), like=text_embeds)
        return xp.take(text_embeds, rows, axis=0), xp.astype(xp.take(mask, rows, axis=0), xp.bool)

    def to_images(self, x) -> np.ndarray:
        """The cascade's x in [-1, 1] as uint8 (B, s, s, 3) images on the host."""
        return to_numpy(to_uint8((x + 1.0) / 2.0))

    def __call__(
        self,
        prompts,
        *,
        steps=None,
        sampler: str | None = None,
        guidance_scale: float | None = None,
        seed: int | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        sr_strength: float | None = None,
        strict: bool = False,
        callback: Callable | None = None,
        generator: np.random.Generator | None = None,
        negative_prompt: str | None = None,
    ) -> Result:
        """Images for `prompts` (a str or a list), a batch of one `Request`. None takes the bundle's
        default: `steps` (per Unet, an int or a list), `sampler`, `guidance_scale`, and `sr_strength`,
        the share of its steps a super-resolution Unet runs, starting from its noised upsampled input
        (1: from pure noise). `seed` or `generator` fixes the noise (one generator draws every image's
        rows); `strict` turns prompt truncation into an error. `negative_prompt` makes the unconditional
        rows where the bundle takes them from a prompt (DeepFloyd IF; None: the empty prompt)."""
        prompts = self._prompts(prompts, num_images_per_prompt)
        settings = self.settings(
            steps=steps, sampler=sampler, guidance_scale=guidance_scale, eta=eta, sr_strength=sr_strength, seed=seed
        )
        request = Request(prompts, num_images_per_prompt, settings.seed, generator, negative_prompt)
        return self.generate([request], settings, strict=strict, callback=callback)[0]

    def generate(
        self, requests: Sequence[Request], settings: Settings | None = None, *, strict: bool = False, callback=None
    ) -> list[Result]:
        """One engine batch for `requests` (at most `max_batch` images in all), which share `settings`
        (None: the bundle's defaults; its seed is not used, each request carries its own): one
        `Result` per request, in order. Request i's rows of every random draw come from its own
        `Generator(PCG64(seed_i))` (or its `generator`); a request without either gets a drawn seed,
        reported in its info. `strict` turns prompt truncation into an error."""
        start = time.perf_counter()
        self._check_requests(requests)
        settings = self._checked(settings)
        self._check_open()
        prompts = [prompt for request in requests for prompt in request.prompt_list]
        negatives = []
        if self.negative_prompts:
            negatives = [request.negative_prompt or "" for request in requests for _ in request.prompt_list]
        texts, empty_ok = prompts, False
        if negatives or self.bundle.manifest.tokenizer.preprocess != "none":
            # prompts are checked as given; a negative prompt may be "" and preprocessing may empty a prompt
            checked = [validate_prompt(prompt, index) for index, prompt in enumerate(prompts)]
            for index, negative in enumerate(negatives):
                try:
                    validate_prompt(negative, index, allow_empty=True)
                except PromptError as error:
                    raise PromptError(f"negative_{error}") from None
            texts, empty_ok = self.preprocess(checked + negatives), True
        input_ids, attention_mask, truncated = self.tokenizer(texts, strict=strict, allow_empty=empty_ok)
        timings = {"tokenize": time.perf_counter() - start}
        seeds = [secrets.randbelow(MAX_SEED) if r.seed is None and r.generator is None else r.seed for r in requests]
        generators = [
            np.random.Generator(np.random.PCG64(seed)) if r.generator is None else r.generator
            for r, seed in zip(requests, seeds, strict=True)
        ]
        engine_start = time.perf_counter()
        rows = len(prompts)
        text_embeds = self.encode(input_ids[:rows], attention_mask[:rows])
        timings["engine_calls"] = 1
        if negatives:  # encoded on their own, as the model's library does (and within the encoder's batch)
            uncond_embeds = self.encode(input_ids[rows:], attention_mask[rows:])
            timings["engine_calls"] = 2
        timings[f"engine:{TEXT_ENCODER}"] = timings["engine"] = time.perf_counter() - engine_start
        counts = [request.n for request in requests for _ in request.prompt_list]
        if negatives:
            uncond_embeds, _ = self.text_conditioning(uncond_embeds, attention_mask[rows:], counts)
        else:
            uncond_embeds = None
        text_embeds, text_mask = self.text_conditioning(text_embeds, attention_mask[:rows], counts)
        timings["text"] = time.perf_counter() - start
        noise = batch_noise(generators, [request.images for request in requests])
        images = self.sample(
            text_embeds, text_mask, noise, settings, callback=callback, timings=timings, uncond_embeds=uncond_embeds
        )
        array = self.to_images(images)
        timings["total"] = time.perf_counter() - start
        return self._results(requests, seeds, array, truncated, settings, timings)

    def _results(self, requests, seeds, array, truncated: list[bool], settings: Settings, timings: dict) -> list:
        """One `Result` per request: its rows of the batch's images and one info per image."""
        batch = {"images": int(array.shape[0]), "requests": len(requests)}
        results, row, first_prompt = [], 0, 0
        for request, seed in zip(requests, seeds, strict=True):
            info = []
            for index in range(request.images):
                prompt = index // request.n  # the request's prompts, each n times
                cut = truncated[first_prompt + prompt]
                negative = request.negative_prompt
                info.append(
                    image_info(self, request.prompt_list[prompt], index, seed, settings, cut, batch, timings, negative)
                )
            results.append(Result(array[row : row + request.images], info))
            row, first_prompt = row + request.images, first_prompt + len(request.prompt_list)
        return results

    def sample(
        self,
        text_embeds,
        text_mask,
        noise: Callable,
        settings: Settings,
        *,
        callback: Callable | None = None,
        timings: dict | None = None,
        uncond_embeds=None,
    ):
        """The cascade on encoded text: x (B, C, s, s) in [-1, 1] after the last Unet, in the loop's
        namespace. `noise(shape)` draws every random number, in the order of docs/bundle.md (NumPy
        arrays, or arrays of the loop's namespace); text_embeds and text_mask are moved there too.
        `uncond_embeds` (B rows): a negative prompt's embeddings, for bundles that take them."""
        self._check_open()
        xp = self.xp
        text_embeds = to_namespace(xp, text_embeds, device=self.device)
        text_mask = to_namespace(xp, text_mask, like=text_embeds)
        if self.negative_prompts and uncond_embeds is None:
            raise ParameterError("uncond_embeds", "the negative prompts' embeddings for this bundle", None)
        if uncond_embeds is not None:
            uncond_embeds = to_namespace(xp, uncond_embeds, like=text_embeds)
        host_noise = noise

        def noise(shape):
            return to_namespace(xp, host_noise(shape), like=text_embeds)

        timings = {} if timings is None else timings
        for key, zero in (("resize", 0.0), ("engine", 0.0), ("engine_calls", 0)):
            timings.setdefault(key, zero)
        manifest = self.bundle.manifest
        defaults = manifest.defaults
        batch = text_embeds.shape[0]
        x = upsampled = None
        for index, (stage, timesteps) in enumerate(zip(self.bundle.unets, self.timesteps(settings), strict=True)):
            stage_start = time.perf_counter()
            size, sampling = manifest.image_sizes[index], stage.how_sampled
            shape, lowres, drawn = (batch, manifest.channels, size, size), {}, None
            step_callback = None if callback is None else (lambda i, t, x, index=index: callback(index, i, t, x))
            percentile = sampling.threshold_percentile or float(defaults.dynamic_thresholding_percentile)
            if sampling.time != "discrete":  # imagen-pytorch's: the stage's per-step table
                x, denoise = sample_table_stage(
                    self.backends[stage.name],
                    sampling,
                    x,
                    shape,
                    text_embeds,
                    text_mask,
                    noise,
                    guidance_scale=settings.guidance(index),
                    percentile=percentile,
                    name=stage.name,
                    callback=step_callback,
                    timings=timings,
                )
            else:
                schedule = self.bundle.schedules[stage.name]
                if index > 0:
                    if sampling.draw_order == "image_first":
                        drawn = noise(shape)
                    upsampled = resize_image(x, size, align_corners=sampling.resize == "bilinear_align_corners")
                    timings["resize"] += time.perf_counter() - stage_start
                    lowres = self._lowres_inputs(upsampled, noise, float(defaults.lowres_sample_noise_level))
                denoise = GuidedDenoiser(
                    self.backends[stage.name],
                    schedule,
                    text_embeds,
                    text_mask,
                    guidance_scale=settings.guidance(index),
                    percentile=percentile,
                    name=stage.name,
                    uncond_embeds=uncond_embeds,
                    threshold_kind=sampling.threshold,
                    threshold_max=sampling.threshold_max,
                    **lowres,
                )
                x = noise(shape) if drawn is None else drawn
                if index > 0 and settings.sr_strength < 1:
                    x = schedule.q_sample(upsampled, timesteps[0], x)
                x = run_sampler(
                    settings.sampler, denoise, x, schedule.alphas_cumprod, timesteps, noise, settings.eta, step_callback
                )
            if not bool(xp.all(xp.isfinite(x))):
                raise NonFiniteError(stage.name, denoise.calls - 1)
            x = xp.clip(x, -1.0, 1.0)
            timings[stage.name] = time.perf_counter() - stage_start
            timings[f"engine:{stage.name}"] = denoise.engine_seconds
            timings["engine"] += denoise.engine_seconds
            timings["engine_calls"] += denoise.calls
        return x

    def _lowres_inputs(self, upsampled, noise: Callable, level: float) -> dict:
        """The noised low-res conditioning of a super-resolution Unet (normalise, then noise)."""
        schedule = self.bundle.schedules[LOWRES]
        t_aug = schedule.noise_level_timestep(level)
        xp = namespace(upsampled)
        return {
            "lowres_cond_img": schedule.q_sample(upsampled, t_aug, noise(tuple(upsampled.shape))),
            "lowres_noise_times": xp.full(
                (upsampled.shape[0],), float(t_aug), dtype=xp.float32, device=device(upsampled)
            ),
        }
