"""The text-to-image pipeline over a bundle (docs/bundle.md, Sampling).

    from imagen.runtime import Pipeline
    pipe = Pipeline.load("bundle/")
    result = pipe("a red circle", steps=20, seed=0)
    result.images[0].save("out.png")

Quiet: the library prints nothing; pass `callback(stage_index, step_index, t, x)` to
follow progress (the CLI draws progress bars with it). A pipeline keeps no state between
requests, so one pipeline serves several threads and a failed request leaves it usable.

The loop runs in the array namespace of the Unet backends (`array_namespace`, runtime/arrays.py):
NumPy with ONNX Runtime on the CPU, CuPy with backends that keep their arrays on a GPU. Tokens
and noise (drawn on the host, so a seed makes the same image on every backend) go there once;
only the final images come back.
"""

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .arrays import backend_device, backend_namespace, device, namespace, to_namespace, to_numpy
from .backends import check_backend_options, open_backends
from .bundle import Bundle, load_bundle
from .contract import LOWRES, MANIFEST, TEXT_ENCODER
from .contract.settings import MAX_SEED, Settings, is_int
from .errors import BackendError, BundleError, NonFiniteError, ParameterError
from .guidance import GuidedDenoiser
from .images import resize_image, to_uint8
from .samplers import run_sampler, spaced_timesteps
from .tokenizer import Tokenizer

DEMO_BUNDLE = Path(__file__).parent / "demo"


@dataclass
class Result:
    """Images of one request: `images` (PIL), `array` (uint8 (N, s, s, 3)) and `info` (one dict per image)."""

    _array: np.ndarray
    info: list[dict]
    images: list = field(init=False)

    def __post_init__(self):
        from PIL import Image

        self.images = [Image.fromarray(np.ascontiguousarray(image)) for image in self._array]

    @property
    def array(self) -> np.ndarray:
        return self._array

    def __len__(self) -> int:
        return len(self.images)


class Pipeline:
    def __init__(self, bundle: Bundle, backends: dict, tokenizer: Tokenizer | None = None, backend_name: str = ""):
        self.bundle = bundle
        self.backends = backends
        self.tokenizer = tokenizer or Tokenizer.from_bundle(bundle)
        self.backend_name = backend_name
        self.max_batch = bundle.max_batch
        self.num_unets = len(bundle.unets)
        namespaces = {backend_namespace(backends[stage.name]) for stage in bundle.unets}
        if len(namespaces) != 1:
            raise BackendError("the Unet backends keep their arrays in different namespaces; open them alike")
        self.xp = namespaces.pop()
        self.device = backend_device(backends[bundle.unets[0].name])

    @classmethod
    def load(cls, path=None, backend: str = "auto", providers=None, threads: int | None = None) -> "Pipeline":
        """Verifies the bundle at `path` (the built-in demo bundle when None), then opens one
        backend per stage (`open_backends`: "auto", "onnxruntime" or "tensorrt")."""
        check_backend_options(backend, threads)
        if path is None:
            if not (DEMO_BUNDLE / MANIFEST).is_file():
                raise BundleError("no built-in demo bundle in this install; pass --bundle PATH / Pipeline.load(path)")
            path = DEMO_BUNDLE
        bundle = load_bundle(path)
        tokenizer = Tokenizer.from_bundle(bundle)
        backends, chosen = open_backends(bundle, backend, providers, threads)
        return cls(bundle, backends, tokenizer, chosen)

    def settings(
        self, *, steps=None, sampler=None, guidance_scale=None, eta=0.0, sr_strength=None, seed=None
    ) -> Settings:
        """The bundle's default settings with these values (None: the default), checked."""
        return self.bundle.default_settings.replace(
            self.bundle.timesteps,
            steps=steps,
            sampler=sampler,
            guidance_scale=guidance_scale,
            eta=eta,
            sr_strength=sr_strength,
            seed=seed,
        )

    def timesteps(self, settings: Settings) -> list[list[int]]:
        """The timesteps each Unet walks (a super-resolution Unet keeps the last sr_strength share)."""
        return [
            spaced_timesteps(total, steps, settings.sr_strength if index > 0 else 1.0)
            for index, (total, steps) in enumerate(zip(self.bundle.timesteps, settings.steps, strict=True))
        ]

    def model_calls(self, settings: Settings) -> list[int]:
        """Unet calls per stage for these settings (what a progress bar counts to)."""
        return [len(timesteps) for timesteps in self.timesteps(settings)]

    def _prompts(self, prompts, num_images: int) -> list[str]:
        if isinstance(prompts, str):
            prompts = [prompts]
        elif isinstance(prompts, (list, tuple)):
            prompts = list(prompts)
        else:
            raise ParameterError("prompts", "a str or a list of str", type(prompts).__name__)
        if not is_int(num_images) or not 1 <= num_images <= self.max_batch:
            raise ParameterError("num_images_per_prompt", f"an integer in [1, {self.max_batch}]", num_images)
        total = len(prompts) * num_images
        if not 1 <= total <= self.max_batch:
            raise ParameterError(
                "prompts",
                f"1 to {self.max_batch} images per request (the bundle's max batch; prompts x num_images_per_prompt)",
                f"{len(prompts)} x {num_images} = {total}",
            )
        return prompts

    def encode(self, input_ids: np.ndarray, attention_mask: np.ndarray):
        """Text embeddings (B, L, D) float32 for tokens (B, L) int64, in the encoder backend's namespace."""
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
        output repeated `repeats[i]` times (an int: every row that many times), the mask as bool."""
        xp = self.xp
        text_embeds = to_namespace(xp, text_embeds, device=self.device)
        mask = to_namespace(xp, attention_mask, like=text_embeds)
        if isinstance(repeats, (list, tuple)):
            repeats = to_namespace(xp, np.asarray(repeats, dtype=np.int64), like=text_embeds)
        else:
            repeats = int(repeats)
        return xp.repeat(text_embeds, repeats, axis=0), xp.astype(xp.repeat(mask, repeats, axis=0), xp.bool)

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
    ) -> Result:
        """Images for `prompts` (a str or a list). None takes the bundle's default: `steps`
        (per Unet, an int or a list), `sampler`, `guidance_scale`, and `sr_strength`, the share
        of its steps a super-resolution Unet runs, starting from its noised upsampled input
        (1: from pure noise). `seed` or `generator` fixes the noise; `strict` turns prompt
        truncation into an error."""
        start = time.perf_counter()
        prompts = self._prompts(prompts, num_images_per_prompt)
        settings = self.settings(
            steps=steps, sampler=sampler, guidance_scale=guidance_scale, eta=eta, sr_strength=sr_strength, seed=seed
        )
        if generator is not None:
            if not isinstance(generator, np.random.Generator):
                raise ParameterError("generator", "a numpy.random.Generator or None", type(generator).__name__)
            if seed is not None:
                raise ParameterError("seed", "None when a generator is given", seed)
        input_ids, attention_mask, truncated = self.tokenizer(prompts, strict=strict)
        timings = {"tokenize": time.perf_counter() - start}
        if generator is None:
            seed = secrets.randbelow(MAX_SEED) if settings.seed is None else settings.seed
            generator = np.random.Generator(np.random.PCG64(seed))

        def noise(shape):
            return generator.standard_normal(tuple(shape), dtype=np.float32)

        engine_start = time.perf_counter()
        text_embeds = self.encode(input_ids, attention_mask)
        timings[f"engine:{TEXT_ENCODER}"] = timings["engine"] = time.perf_counter() - engine_start
        timings["engine_calls"] = 1
        repeat = num_images_per_prompt
        text_embeds, text_mask = self.text_conditioning(text_embeds, attention_mask, repeat)
        timings["text"] = time.perf_counter() - start
        x = self.sample(text_embeds, text_mask, noise, settings, callback=callback, timings=timings)
        array = self.to_images(x)
        timings["total"] = time.perf_counter() - start
        info = [
            {
                "index": index,
                "prompt": prompts[index // repeat],
                "seed": seed,
                **settings.to_info(),
                "truncated": truncated[index // repeat],
                "bundle_sha": self.bundle.short_sha,
                "backend": self.backend_name,
                "timings": dict(timings),
            }
            for index in range(array.shape[0])
        ]
        return Result(array, info)

    def sample(
        self,
        text_embeds,
        text_mask,
        noise: Callable,
        settings: Settings,
        *,
        callback: Callable | None = None,
        timings: dict | None = None,
    ):
        """The cascade on encoded text: x (B, C, s, s) in [-1, 1] after the last Unet, in the loop's
        namespace. `noise(shape)` draws every random number, in the order of docs/bundle.md (NumPy
        arrays, or arrays of the loop's namespace); text_embeds and text_mask are moved there too."""
        xp = self.xp
        text_embeds = to_namespace(xp, text_embeds, device=self.device)
        text_mask = to_namespace(xp, text_mask, like=text_embeds)
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
            size, schedule = manifest.image_sizes[index], self.bundle.schedules[stage.name]
            lowres = {}
            if index > 0:
                upsampled = resize_image(x, size)
                timings["resize"] += time.perf_counter() - stage_start
                lowres = self._lowres_inputs(upsampled, noise, float(defaults.lowres_sample_noise_level))
            denoise = GuidedDenoiser(
                self.backends[stage.name],
                schedule,
                text_embeds,
                text_mask,
                guidance_scale=settings.guidance_scale,
                percentile=float(defaults.dynamic_thresholding_percentile),
                name=stage.name,
                **lowres,
            )
            x = noise((batch, manifest.channels, size, size))
            if index > 0 and settings.sr_strength < 1:
                x = schedule.q_sample(upsampled, timesteps[0], x)
            step_callback = None if callback is None else (lambda i, t, x, index=index: callback(index, i, t, x))
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
