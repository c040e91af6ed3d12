"""The text-to-image pipeline over a bundle (docs/bundle.md, Sampling).

    from imagen.runtime import Pipeline
    pipe = Pipeline.load("bundle/")
    result = pipe("a red circle", steps=20, seed=0)
    result.images[0].save("out.png")

Quiet: the library prints nothing; pass `callback(stage_index, step_index, t, x)` to
follow progress (the CLI draws progress bars with it). A pipeline keeps no state between
requests, so one pipeline serves several threads and a failed request leaves it usable.
"""

import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .backends import OnnxRuntimeBackend, TensorRTBackend, check_engines_match, tensorrt_environment
from .bundle import Manifest, load_manifest
from .errors import BackendError, BundleError, NonFiniteError, ParameterError
from .guidance import dynamic_threshold, guide
from .resize import resize_image
from .samplers import SAMPLERS, run_sampler
from .tokenizer import Tokenizer

DEMO_BUNDLE = Path(__file__).parent / "demo"
BACKENDS = ("auto", "onnxruntime", "tensorrt")
MAX_SEED = 2**63


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_)
    )


def to_uint8(x: np.ndarray) -> np.ndarray:
    """(N, C, s, s) in [-1, 1] -> uint8 (N, s, s, C): floor(clip((x + 1) / 2, 0, 1) * 255 + 0.5)."""
    image = np.clip((x + np.float32(1)) / np.float32(2), 0, 1)
    return np.floor(image * np.float32(255) + np.float32(0.5)).astype(np.uint8).transpose(0, 2, 3, 1)


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
    def __init__(
        self, manifest: Manifest, backends: dict, tokenizer: Tokenizer | None = None, backend_name: str = ""
    ):
        self.manifest = manifest
        self.backends = backends
        self.tokenizer = tokenizer or Tokenizer.from_manifest(manifest.data, manifest.root)
        self.backend_name = backend_name
        self.defaults = manifest.defaults
        self.max_batch = manifest.max_batch
        self.num_unets = len(manifest.image_sizes)

    @classmethod
    def load(cls, path=None, backend: str = "auto", providers=None, threads: int | None = None) -> "Pipeline":
        """Verifies the bundle at `path` (the built-in demo bundle when None), then opens one
        session per stage.

        backend: "onnxruntime"; "tensorrt" (the bundle's engines, on an NVIDIA GPU); "auto":
        TensorRT when the bundle has engines usable here, else onnxruntime. providers: onnxruntime
        execution providers (None: CPU; "auto": CUDA/TensorRT providers when installed)."""
        if backend not in BACKENDS:
            raise ParameterError("backend", f"one of {', '.join(BACKENDS)}", backend)
        if threads is not None and (not _is_int(threads) or threads < 1):
            raise ParameterError("threads", "a positive integer or None", threads)
        if path is None:
            if not (DEMO_BUNDLE / "manifest.json").is_file():
                raise BundleError(
                    "no built-in demo bundle in this install; pass --bundle PATH / Pipeline.load(path)"
                )
            path = DEMO_BUNDLE
        manifest = load_manifest(path, tensorrt_engines=backend == "tensorrt")
        tokenizer = Tokenizer.from_manifest(manifest.data, manifest.root)
        engines = manifest.data.get("tensorrt")
        chosen = "onnxruntime"
        if backend == "tensorrt":
            _, _, capability, version = tensorrt_environment()  # BackendError: what is missing
            check_engines_match(engines, capability, version)  # BundleError: built for another GPU/TensorRT
            chosen = "tensorrt"
        elif backend == "auto" and engines:
            try:
                _, _, capability, version = tensorrt_environment()
                check_engines_match(engines, capability, version)
                manifest = load_manifest(path, tensorrt_engines=True)
                chosen = "tensorrt"
            except (BackendError, BundleError):
                chosen = "onnxruntime"
        backends = {}
        for name, stage in manifest.stages.items():
            if chosen == "tensorrt":
                entry = (engines or {}).get("engines", {}).get(name)
                if entry is None:
                    raise BundleError(
                        f"{manifest.root / 'manifest.json'} has no TensorRT engine for {name}; rebuild "
                        "with imagen-export --tensorrt, or use --backend onnxruntime"
                    )
                backends[name] = TensorRTBackend(manifest.root / entry["file"], stage, engines)
            else:
                backends[name] = OnnxRuntimeBackend(stage.path, stage, providers=providers, threads=threads)
        return cls(manifest, backends, tokenizer, chosen)

    # Validation

    def _validate(self, prompts, steps, sampler, guidance_scale, seed, num_images, eta, generator, sr_strength):
        if isinstance(prompts, str):
            prompts = [prompts]
        elif isinstance(prompts, (list, tuple)):
            prompts = list(prompts)
        else:
            raise ParameterError("prompts", "a str or a list of str", type(prompts).__name__)
        if not _is_int(num_images) or not 1 <= num_images <= self.max_batch:
            raise ParameterError("num_images_per_prompt", f"an integer in [1, {self.max_batch}]", num_images)
        total = len(prompts) * num_images
        if not 1 <= total <= self.max_batch:
            raise ParameterError(
                "prompts",
                f"1 to {self.max_batch} images per request (the bundle's max batch; "
                f"prompts x num_images_per_prompt)",
                f"{len(prompts)} x {num_images} = {total}",
            )
        sampler = self.defaults.get("sampler", "ddpm") if sampler is None else sampler
        if not isinstance(sampler, str) or sampler not in SAMPLERS:
            raise ParameterError("sampler", f"one of {', '.join(SAMPLERS)}", sampler)
        steps_per_unet = self._steps(steps)
        scale = self.defaults["guidance_scale"] if guidance_scale is None else guidance_scale
        if not _is_number(scale) or not math.isfinite(scale) or scale < 0:
            raise ParameterError("guidance_scale", "a finite number >= 0", guidance_scale)
        if not _is_number(eta) or not math.isfinite(eta) or not 0 <= eta <= 1:
            raise ParameterError("eta", "a number in [0, 1]", eta)
        sr_strength = self._sr_strength(sr_strength)
        if generator is not None:
            if not isinstance(generator, np.random.Generator):
                raise ParameterError(
                    "generator", "a numpy.random.Generator or None", type(generator).__name__
                )
            if seed is not None:
                raise ParameterError("seed", "None when a generator is given", seed)
        elif seed is not None and (not _is_int(seed) or not 0 <= seed < MAX_SEED):
            raise ParameterError("seed", "None or an integer in [0, 2**63)", seed)
        return prompts, steps_per_unet, sampler, float(scale), float(eta), sr_strength

    def _sr_strength(self, sr_strength) -> float:
        value = self.defaults.get("sr_strength", 1.0) if sr_strength is None else sr_strength
        if not _is_number(value) or not math.isfinite(value) or not 0 < value <= 1:
            raise ParameterError("sr_strength", "a number in (0, 1] (1: super-resolution from pure noise)",
                                 sr_strength)
        return float(value)

    def model_calls(self, steps=None, sr_strength=None) -> list[int]:
        """Unet calls per stage for these settings (what a progress bar counts to)."""
        strength = self._sr_strength(sr_strength)
        return [len(self.manifest.schedules[f"unet_{i}"].timesteps(n, strength if i > 0 else 1.0))
                for i, n in enumerate(self._steps(steps))]

    def _steps(self, steps) -> list[int]:
        totals = [self.manifest.schedules[f"unet_{i}"].num_timesteps for i in range(self.num_unets)]
        if steps is None:
            steps = self.defaults.get("steps")
            if isinstance(steps, dict):
                steps = [steps.get(f"unet_{i}") for i in range(self.num_unets)]
        per_unet = list(steps) if isinstance(steps, (list, tuple)) else [steps] * self.num_unets
        if len(per_unet) != self.num_unets:
            raise ParameterError("steps", f"an integer or a list of {self.num_unets} (one per Unet)", steps)
        out = []
        for value, total in zip(per_unet, totals, strict=False):
            if value is None:
                out.append(total)
            elif not _is_int(value) or not 1 <= value <= total:
                raise ParameterError(
                    "steps", f"None or an integer in [1, {total}] (the schedule's timesteps)", value
                )
            else:
                out.append(int(value))
        return out

    # Sampling

    def encode(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        embeds = self.backends["text_encoder"].run({"input_ids": input_ids, "attention_mask": attention_mask})
        embeds = embeds["text_embeds"]
        if not np.all(np.isfinite(embeds)):
            raise NonFiniteError("text_encoder")
        return embeds

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
        prompts, steps_per_unet, sampler, scale, eta, sr_strength = self._validate(
            prompts, steps, sampler, guidance_scale, seed, num_images_per_prompt, eta, generator, sr_strength
        )
        input_ids, attention_mask, truncated = self.tokenizer(prompts, strict=strict)
        if generator is None:
            seed = secrets.randbelow(MAX_SEED) if seed is None else int(seed)
            generator = np.random.Generator(np.random.PCG64(seed))

        def draw(shape):
            return generator.standard_normal(tuple(shape), dtype=np.float32)

        text_embeds = self.encode(input_ids, attention_mask)
        repeat = num_images_per_prompt
        text_embeds = np.repeat(text_embeds, repeat, axis=0)
        text_mask = np.repeat(attention_mask, repeat, axis=0).astype(bool)
        timings = {"text": time.perf_counter() - start}
        x = self.sample(
            text_embeds,
            text_mask,
            draw,
            sampler=sampler,
            steps=steps_per_unet,
            guidance_scale=scale,
            eta=eta,
            sr_strength=sr_strength,
            callback=callback,
            timings=timings,
        )
        array = to_uint8(x)
        timings["total"] = time.perf_counter() - start
        info = []
        for index in range(array.shape[0]):
            prompt_index = index // repeat
            info.append(
                {
                    "index": index,
                    "prompt": prompts[prompt_index],
                    "seed": seed,
                    "sampler": sampler,
                    "steps": list(steps_per_unet),
                    "guidance_scale": scale,
                    "eta": eta,
                    "sr_strength": sr_strength,
                    "truncated": truncated[prompt_index],
                    "bundle_sha": self.manifest.short_sha,
                    "backend": self.backend_name,
                    "timings": dict(timings),
                }
            )
        return Result(array, info)

    def sample(
        self,
        text_embeds: np.ndarray,
        text_mask: np.ndarray,
        draw: Callable,
        *,
        sampler: str,
        steps: list[int],
        guidance_scale: float,
        eta: float = 0.0,
        sr_strength: float = 1.0,
        callback: Callable | None = None,
        timings: dict | None = None,
    ) -> np.ndarray:
        """The cascade on encoded text: x (B, C, s, s) in [-1, 1] after the last Unet."""
        manifest = self.manifest
        batch = text_embeds.shape[0]
        percentile = float(self.defaults["dynamic_thresholding_percentile"])
        level = float(self.defaults["lowres_sample_noise_level"])
        rows = batch if guidance_scale == 1 else 2 * batch
        copies = rows // batch
        text_keep = np.arange(rows) < batch
        embeds_rows = np.concatenate([text_embeds] * copies) if copies > 1 else text_embeds
        mask_rows = np.concatenate([text_mask] * copies) if copies > 1 else text_mask
        x = None
        for index, (stage, size) in enumerate(zip(manifest.unets, manifest.image_sizes, strict=False)):
            unet_start = time.perf_counter()
            schedule = manifest.schedules[stage.name]
            backend = self.backends[stage.name]
            lowres = {}
            if index > 0:
                low = manifest.schedules["lowres"]
                up = resize_image(x, size)
                t_aug = low.noise_level_timestep(level)
                cond_img = low.q_sample(up, t_aug, draw(up.shape))
                lowres = {
                    "lowres_cond_img": np.concatenate([cond_img] * copies) if copies > 1 else cond_img,
                    "lowres_noise_times": np.full((rows,), float(t_aug), dtype=np.float32),
                }
            calls = [0]

            def denoise(x, t, stage=stage, schedule=schedule, backend=backend, lowres=lowres, calls=calls):
                feeds = {
                    "x": np.concatenate([x] * copies) if copies > 1 else x,
                    "time": np.full((rows,), float(t), dtype=np.float32),
                    "text_embeds": embeds_rows,
                    "text_mask": mask_rows,
                    "text_keep": text_keep,
                    **lowres,
                }
                pred = backend.run(feeds)["noise_pred"]
                step = calls[0]
                calls[0] += 1
                if not np.all(np.isfinite(pred)):
                    raise NonFiniteError(stage.name, step, t)
                eps = pred if copies == 1 else guide(pred[:batch], pred[batch:], guidance_scale)
                x0 = (
                    schedule.coef("sqrt_recip_alphas_cumprod", t) * x
                    - schedule.coef("sqrt_recipm1_alphas_cumprod", t) * eps
                )
                return dynamic_threshold(x0, percentile)

            step_callback = (
                None if callback is None else (lambda i, t, x, index=index: callback(index, i, t, x))
            )
            strength = sr_strength if index > 0 else 1.0
            timesteps = schedule.timesteps(steps[index], strength)
            x = draw((batch, manifest.channels, size, size))
            if strength < 1:
                x = schedule.q_sample(up, timesteps[0], x)
            x = run_sampler(
                sampler,
                denoise,
                x,
                schedule.alphas_cumprod,
                timesteps,
                draw,
                eta,
                step_callback,
            )
            if not np.all(np.isfinite(x)):
                raise NonFiniteError(stage.name, calls[0] - 1)
            x = np.clip(x, np.float32(-1), np.float32(1))
            if timings is not None:
                timings[stage.name] = time.perf_counter() - unet_start
        return x
