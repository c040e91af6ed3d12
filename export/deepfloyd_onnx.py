"""DeepFloyd IF stages -> ONNX: `IFUnetStage` gives diffusers' Unet this project's signature,
`export_if_unet` and `export_if_text_encoder` write the files, one stage at a time (each model is
loaded, exported and freed before the next). `deepfloyd.read_if_folder` says what a folder holds.
"""

import importlib.util
from pathlib import Path

import torch
from torch import nn

from imagen.reference.text_encoder import TextEncoder, TextEncoderError, folder_tokenizer
from imagen.runtime.contract import text_encoder_signature

from .deepfloyd import MAX_LENGTH, IFStage
from .errors import ExportError
from .external_data import EXTERNAL_DATA_THRESHOLD
from .onnx_export import TextEncoderStage, export_stage


class IFUnetStage(nn.Module):
    """diffusers' Unet with this project's positional inputs: the low-res image beside x and its
    noise level as `class_labels` (stage II), the output split into noise and learned variance.
    `time` and `lowres_noise_times` are float32: diffusers' sinusoidal projection casts its
    timesteps to float32 first, so float and int64 times of the same values embed identically."""

    def __init__(self, unet: nn.Module, channels: int, learned_variance: bool, lowres_cond: bool):
        super().__init__()
        self.unet = unet
        self.channels, self.learned_variance, self.lowres_cond = channels, learned_variance, lowres_cond

    def forward(self, x, time, text_embeds, lowres_cond_img=None, lowres_noise_times=None):
        if self.lowres_cond:
            x = torch.cat([x, lowres_cond_img], dim=1)  # (b, 2c, h, w) as the pipeline concatenates
        out = self.unet(x, time, encoder_hidden_states=text_embeds, class_labels=lowres_noise_times, return_dict=False)[
            0
        ]
        noise_pred = out[:, : self.channels]
        if self.learned_variance:
            return noise_pred, out[:, self.channels : 2 * self.channels]
        return noise_pred  # fixed_small: diffusers drops any further channels as well


def weights_variant(folder: Path) -> str | None:
    """The weights variant to load from `folder`: "fp16" when it holds only the FP16 files
    (`*.fp16.safetensors`, as DeepFloyd's repositories offer them to download alone), None when it
    has the plain ones."""
    names = [p.name for p in Path(folder).glob("*.safetensors")] + [p.name for p in Path(folder).glob("*.bin")]
    plain = [n for n in names if ".fp16" not in n]
    return "fp16" if not plain and any(".fp16" in n for n in names) else None


def load_if_unet(stage: IFStage) -> IFUnetStage:
    """The stage's Unet in float32, eval mode, wrapped in this project's signature."""
    from diffusers import UNet2DConditionModel
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    try:
        # without accelerate, diffusers builds the model and then loads the weights (twice the memory)
        # FP16 weights are upcast: the export traces and checks parity in FP32 (--fp16 converts after)
        unet = UNet2DConditionModel.from_pretrained(
            stage.folder / "unet",
            variant=weights_variant(stage.folder / "unet"),
            torch_dtype=torch.float32,
            low_cpu_mem_usage=importlib.util.find_spec("accelerate") is not None,
        )
    except Exception as error:  # diffusers raises many kinds; name the folder
        raise ExportError(f"could not load the Unet from {stage.folder / 'unet'}: {error}") from error
    unet = unet.eval().requires_grad_(False)
    return IFUnetStage(unet, stage.channels, stage.learned_variance, stage.lowres_cond)


def export_if_unet(
    stage: IFStage,
    out_path: str | Path,
    max_batch: int,
    max_length: int = MAX_LENGTH,
    opset: int = 18,
    *,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
) -> list[Path]:
    """Exports the stage's Unet to `out_path` (FP32, symbolic batch up to 2 * max_batch); returns
    the files written (the model, then its external data). The Unet is freed before returning, so
    a cascade is exported one stage at a time."""
    module = load_if_unet(stage)
    signature = stage.signature(max_batch, max_length)
    kwargs = {"timesteps": stage.schedule.num_train_timesteps}
    return export_stage(
        module, signature, Path(out_path), opset, external_data_threshold=external_data_threshold, **kwargs
    )


def load_if_text_encoder(path: str | Path, max_length: int = MAX_LENGTH) -> TextEncoder:
    """The T5 encoder and tokenizer of an IF folder (`text_encoder/` + `tokenizer/`), or of a plain T5
    folder (config.json, weights and spiece.model together), with IF's text semantics: 77 tokens,
    embeddings kept at padding positions (IF's Unet pools over every position)."""
    from transformers import T5EncoderModel
    from transformers.utils import logging as hf_logging

    path = Path(path)
    model_dir, tokenizer_dir = (
        (path / "text_encoder", path / "tokenizer") if (path / "text_encoder").is_dir() else (path, path)
    )
    if not (model_dir / "config.json").is_file():
        raise ExportError(
            f"{path} has no T5 encoder: pass an IF stage I folder (text_encoder/ and tokenizer/) or a T5 "
            "folder saved with save_pretrained"
        )
    hf_logging.disable_progress_bar()
    try:
        # eager attention: the exporter gives a correct graph with a symbolic batch for it
        model = T5EncoderModel.from_pretrained(
            model_dir, attn_implementation="eager", dtype=torch.float32, variant=weights_variant(model_dir)
        )
        tokenizer = folder_tokenizer(tokenizer_dir, None, max_length, model.config.vocab_size)
    except TextEncoderError as error:
        raise ExportError(f"{tokenizer_dir}: {error}") from error
    except Exception as error:  # transformers raises many kinds; name the folder
        raise ExportError(f"could not load a T5 encoder from {model_dir}: {error}") from error
    return TextEncoder(model, tokenizer, zero_padding=False)


def export_if_text_encoder(
    path: str | Path,
    out_path: str | Path,
    max_batch: int,
    max_length: int = MAX_LENGTH,
    opset: int = 18,
    *,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
) -> list[Path]:
    """Exports the T5 encoder of `path` (see `load_if_text_encoder`) to `out_path` in FP32; returns
    the files written."""
    encoder = load_if_text_encoder(path, max_length)
    signature = text_encoder_signature(max_length, encoder.embed_dim, max_batch)
    kwargs = {"vocab_size": encoder.tokenizer.vocab_size}
    return export_stage(
        TextEncoderStage(encoder),
        signature,
        Path(out_path),
        opset,
        external_data_threshold=external_data_threshold,
        **kwargs,
    )
