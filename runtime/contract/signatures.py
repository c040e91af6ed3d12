"""Stage signatures, declared once: `TensorSpec`, `StageSignature`, `text_encoder_signature`
and `unet_signature` give each stage's tensor names, dtypes, shapes (with a symbolic batch)
and min/opt/max batch. ONNX export, parity inputs, TensorRT profiles, the manifest and the
runtime's feed checks all derive from them, as the TensorRT demo's per-stage getters do.
"""

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMAT, FORMAT_VERSION = "imagen-bundle", 2
SUPPORTED_VERSIONS = (1, 2)  # 2: stages may say how they are sampled (contract/sampling.py)
MANIFEST = "manifest.json"
REEXPORT = "re-export the bundle with imagen-export"
BATCH = "batch"  # the symbolic batch dimension of every stage input and output
TEXT_ENCODER = "text_encoder"
LOWRES = "lowres"  # the schedule that noises the low-res conditioning image
TOKENIZER_KINDS = ("byte", "sentencepiece")
PREPROCESS_MODES = ("none", "lower_strip", "clean_caption")  # what a prompt goes through before tokens
MAX_TOKEN_ID = 2**31 - 256  # token ids (byte + offset included) must fit int64 with room to spare


def unet_name(index: int) -> str:
    return f"unet_{index}"


def stage_names(num_unets: int) -> list[str]:
    return [TEXT_ENCODER] + [unet_name(i) for i in range(num_unets)]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name
    shape: tuple  # ints, or BATCH for the symbolic batch dimension

    def concrete(self, batch: int) -> tuple[int, ...]:
        return tuple(batch if d == BATCH else d for d in self.shape)

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class StageSignature:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    batch_min: int
    batch_opt: int
    batch_max: int

    @property
    def input_names(self) -> list[str]:
        return [spec.name for spec in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [spec.name for spec in self.outputs]

    def to_json(self) -> dict:
        return {
            "inputs": [s.to_json() for s in self.inputs],
            "outputs": [s.to_json() for s in self.outputs],
            "batch": {"min": self.batch_min, "opt": self.batch_opt, "max": self.batch_max},
        }

    def sample_inputs(
        self,
        batch: int,
        rng: np.random.Generator,
        *,
        vocab_size: int = 259,
        timesteps: int = 1000,
        time_range: tuple[float, float] | None = None,
    ) -> dict[str, np.ndarray]:
        """Random inputs of the right kind for parity checks and benchmarks: valid ids and
        masks (one full-length row), integer times in [0, timesteps) (or, for a Unet fed a
        continuous time such as a log-SNR, uniform in `time_range`), half the rows with text."""
        feeds: dict[str, np.ndarray] = {}
        lengths = None
        for spec in self.inputs:
            shape = spec.concrete(batch)
            if spec.name in ("input_ids", "attention_mask", "text_mask"):
                if lengths is None:
                    lengths = rng.integers(1, shape[1] + 1, size=batch)
                    lengths[0] = shape[1]
                mask = np.arange(shape[1])[None, :] < lengths[:, None]
                if spec.name == "input_ids":
                    feeds[spec.name] = np.where(mask, rng.integers(3, vocab_size, size=shape), 0).astype(np.int64)
                else:
                    feeds[spec.name] = mask.astype(spec.dtype)
            elif spec.name in ("time", "lowres_noise_times") and time_range is not None:
                feeds[spec.name] = rng.uniform(*time_range, size=shape).astype(np.float32)
            elif spec.name in ("time", "lowres_noise_times"):
                feeds[spec.name] = rng.integers(0, timesteps, size=shape).astype(np.float32)
            elif spec.name == "text_keep":
                feeds[spec.name] = np.arange(batch) % 2 == 0
            else:
                feeds[spec.name] = rng.standard_normal(shape, dtype=np.float32)
        return feeds


def text_encoder_signature(max_length: int, embed_dim: int, max_batch: int) -> StageSignature:
    return StageSignature(
        TEXT_ENCODER,
        inputs=(
            TensorSpec("input_ids", "int64", (BATCH, max_length)),
            TensorSpec("attention_mask", "int64", (BATCH, max_length)),
        ),
        outputs=(TensorSpec("text_embeds", "float32", (BATCH, max_length, embed_dim)),),
        batch_min=1,
        batch_opt=1,
        batch_max=max_batch,
    )


def unet_signature(
    index: int,
    image_size: int,
    max_length: int,
    embed_dim: int,
    lowres_cond: bool,
    max_batch: int,
    channels: int = 3,
    *,
    null_text: bool = True,
    learned_variance: bool = False,
    self_cond: bool = False,
    prediction: str = "noise",
) -> StageSignature:
    """The Unet inputs, in the order of the reference Unet's forward. A Unet stage runs cond and
    uncond rows together (classifier-free guidance in one call), so its batch goes up to 2 * max_batch.

    `null_text`: the Unet swaps in its learned null text for rows whose `text_keep` is false and
    masks padded tokens with `text_mask` (this project's Unets, MinImagen's, imagen-pytorch's);
    without it the unconditional rows are a negative prompt's embeddings and the Unet reads every
    token (DeepFloyd IF). `learned_variance`: the Unet also outputs `variance_pred`, the learned
    interpolation in [-1, 1] between the posterior's log-variance and log beta (IF's
    `learned_range`). `self_cond`: the Unet also takes `self_cond`, the previous step's data
    prediction (zeros at the first step; imagen-pytorch's self-conditioning). `prediction`: what
    the Unet outputs, which names its output `{prediction}_pred` (contract/sampling.py,
    PREDICTIONS: `noise_pred`, `x_start_pred`, `v_pred`, or `edm_pred`, the raw output F of an
    EDM-preconditioned Unet)."""
    image = (BATCH, channels, image_size, image_size)
    inputs = [
        TensorSpec("x", "float32", image),
        TensorSpec("time", "float32", (BATCH,)),
        TensorSpec("text_embeds", "float32", (BATCH, max_length, embed_dim)),
    ]
    if null_text:
        inputs += [TensorSpec("text_mask", "bool", (BATCH, max_length)), TensorSpec("text_keep", "bool", (BATCH,))]
    if self_cond:
        inputs.append(TensorSpec("self_cond", "float32", image))
    if lowres_cond:
        inputs += [
            TensorSpec("lowres_cond_img", "float32", image),
            TensorSpec("lowres_noise_times", "float32", (BATCH,)),
        ]
    outputs = [TensorSpec(f"{prediction}_pred", "float32", image)]
    if learned_variance:
        outputs.append(TensorSpec("variance_pred", "float32", image))
    return StageSignature(
        unet_name(index),
        inputs=tuple(inputs),
        outputs=tuple(outputs),
        batch_min=1,
        batch_opt=2,
        batch_max=2 * max_batch,
    )
