"""The frozen T5 text encoder and its tokenizers.

Two kinds, both tokenized exactly as the runtime does (docs/bundle.md):
- `byte`: ByT5's convention (UTF-8 bytes + 3, pad 0, eos 1) over a small, seeded,
  randomly initialised T5 encoder: the offline default, made on any machine.
- `sentencepiece`: a real T5 checkpoint from a local folder (`config.json`,
  weights, `spiece.model`), e.g. t5-small saved with `save_pretrained`.
Embeddings are zero where the mask is 0. Prompts are padded to `max_length`.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from imagen._io import atomic_save_folder

TOKENIZER_FILE = "tokenizer.json"
DEFAULT_MAX_LENGTH = 256  # MinImagen's


class TextEncoderError(ValueError):
    """A text encoder folder or setting that cannot be used; the message says what to pass."""


class ByteTokenizer:
    kind = "byte"
    pad_id, eos_id, offset = 0, 1, 3
    vocab_size = 256 + 3

    def __init__(self, max_length: int):
        if max_length < 2:
            raise TextEncoderError(f"max_length must be at least 2 (one token and eos), got {max_length}")
        self.max_length = max_length

    def ids(self, text: str) -> list[int]:
        return [b + self.offset for b in text.encode("utf-8")]

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, list[bool]]:
        """(input_ids int64 (b, L), attention_mask int64 (b, L), truncated per prompt)."""
        input_ids = np.full((len(texts), self.max_length), self.pad_id, dtype=np.int64)
        attention_mask = np.zeros((len(texts), self.max_length), dtype=np.int64)
        truncated = []
        for row, text in enumerate(texts):
            ids = self.ids(text)
            truncated.append(len(ids) > self.max_length - 1)
            ids = ids[: self.max_length - 1] + [self.eos_id]
            input_ids[row, : len(ids)] = ids
            attention_mask[row, : len(ids)] = 1
        return input_ids, attention_mask, truncated

    def to_dict(self) -> dict:
        return {"kind": self.kind, "max_length": self.max_length, "pad_id": self.pad_id,
                "eos_id": self.eos_id, "offset": self.offset, "files": {}}


class SentencePieceTokenizer(ByteTokenizer):
    kind = "sentencepiece"
    offset = 0

    def __init__(self, model_file: str | Path, max_length: int, pad_id: int = 0, eos_id: int = 1):
        super().__init__(max_length)
        import sentencepiece

        self.model_file = Path(model_file)
        self.processor = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        self.pad_id, self.eos_id = pad_id, eos_id
        self.vocab_size = self.processor.get_piece_size()

    def ids(self, text: str) -> list[int]:
        return list(self.processor.encode(text))

    def to_dict(self) -> dict:
        return {**super().to_dict(), "files": {"spiece.model": {}}}


def _quiet_transformers() -> None:
    """transformers shows progress bars when loading and saving; library calls stay quiet."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def tiny_t5_config(vocab_size: int = 384, d_model: int = 128, num_layers: int = 2, num_heads: int = 4):
    from transformers import T5Config

    return T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=d_model // num_heads, d_ff=2 * d_model,
                    num_layers=num_layers, num_heads=num_heads, dropout_rate=0.0,
                    feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)


class TextEncoder(nn.Module):
    """T5 encoder + tokenizer; `forward(input_ids, attention_mask) -> text_embeds` is the exported stage."""

    def __init__(self, model, tokenizer: ByteTokenizer):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.embed_dim = model.config.d_model
        self.max_length = tokenizer.max_length

    @classmethod
    def tiny(cls, seed: int = 0, max_length: int = 64, d_model: int = 128) -> "TextEncoder":
        """The offline default: a small T5 encoder, randomly initialised from `seed`, over bytes."""
        from transformers import T5EncoderModel

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = T5EncoderModel(tiny_t5_config(d_model=d_model))
        model.config._attn_implementation = "eager"
        return cls(model, ByteTokenizer(max_length))

    @classmethod
    def from_folder(cls, path: str | Path, max_length: int | None = None) -> "TextEncoder":
        """Loads a folder written by `save`, or a Hugging Face T5 folder (config.json, weights, spiece.model)."""
        from transformers import T5EncoderModel

        path = Path(path)
        if not (path / "config.json").is_file():
            raise TextEncoderError(f"{path} is not a T5 folder (no config.json); pass a folder saved with "
                                   "save_pretrained, e.g. a local copy of t5-small")
        settings = json.loads((path / TOKENIZER_FILE).read_text()) if (path / TOKENIZER_FILE).is_file() else None
        _quiet_transformers()
        try:
            model = T5EncoderModel.from_pretrained(path, attn_implementation="eager")
        except Exception as error:  # transformers raises many kinds; name the folder
            raise TextEncoderError(f"could not load a T5 encoder from {path}: {error}") from error
        if settings is None or settings["kind"] == "sentencepiece":
            spiece = path / "spiece.model"
            if not spiece.is_file():
                raise TextEncoderError(f"{path} has no spiece.model; a T5 folder needs its sentencepiece vocabulary")
            length = max_length or (settings or {}).get("max_length", DEFAULT_MAX_LENGTH)
            tokenizer = SentencePieceTokenizer(spiece, length)
        else:
            tokenizer = ByteTokenizer(max_length or settings["max_length"])
        return cls(model, tokenizer)

    def save(self, path: str | Path) -> None:
        """Writes weights (safetensors), config and tokenizer settings into the folder `path`: staged
        beside it and renamed into place, so a failed save leaves no half-written folder."""

        def save(staging: Path) -> None:
            _quiet_transformers()
            self.model.save_pretrained(staging, safe_serialization=True)
            if isinstance(self.tokenizer, SentencePieceTokenizer):
                shutil.copyfile(self.tokenizer.model_file, staging / "spiece.model")
            (staging / TOKENIZER_FILE).write_text(json.dumps(self.tokenizer.to_dict(), indent=2))

        atomic_save_folder(path, save)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return hidden * attention_mask[:, :, None].to(hidden.dtype)

    @torch.no_grad()
    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """text_embeds (b, L, d) float32 and text_mask (b, L) bool."""
        input_ids, attention_mask, _ = self.tokenizer(texts)
        input_ids, attention_mask = torch.from_numpy(input_ids), torch.from_numpy(attention_mask)
        return self.forward(input_ids, attention_mask), attention_mask.bool()
