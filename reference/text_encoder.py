"""The frozen T5 text encoder and its tokenizers.

Two kinds, both tokenized exactly as the runtime does (docs/bundle.md, Tokenization):
- `byte`: ByT5's convention (UTF-8 bytes + 3, pad 0, eos 1) over a small, seeded,
  randomly initialised T5 encoder: the offline default, made on any machine.
- `sentencepiece`: a real T5 checkpoint from a local folder (`config.json`, weights,
  `spiece.model`, and transformers' `tokenizer.json` / `tokenizer_config.json` if present),
  e.g. t5-small saved with `save_pretrained`; ids are those transformers' T5 tokenizer gives.
Embeddings are zero where the mask is 0. Prompts are padded to `max_length`.
"""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from imagen._io import atomic_save_folder

TOKENIZER_FILE = "imagen_tokenizer.json"  # this project's tokenizer settings in a text encoder folder
OLD_TOKENIZER_FILE = "tokenizer.json"  # where run directories kept them before; also transformers' file
HF_TOKENIZER_CONFIG = "tokenizer_config.json"
KINDS = ("byte", "sentencepiece")
T5_EXTRA_IDS = 100  # transformers' T5 tokenizer adds <extra_id_0> ... <extra_id_99> unless told otherwise
DEFAULT_MAX_LENGTH = 256  # MinImagen's
# Unicode White_Space (Rust's char::is_whitespace): the tokenizers library splits words on these
WHITE_SPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000" + "".join(map(chr, range(0x2000, 0x200B)))
EXTRA_ID = re.compile(r"<extra_id_(\d+)>")


class TextEncoderError(ValueError):
    """A text encoder folder or setting that cannot be used; the message says what to pass."""


class ByteTokenizer:
    kind = "byte"
    pad_id, eos_id, offset = 0, 1, 3
    extra_ids = 0
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
        return {
            "kind": self.kind,
            "max_length": self.max_length,
            "pad_id": self.pad_id,
            "eos_id": self.eos_id,
            "offset": self.offset,
            "files": {},
        }


class SentencePieceTokenizer(ByteTokenizer):
    """transformers' T5 tokenizer (5.x) without transformers: the text of a special token (the pad,
    eos and unk pieces, and `<extra_id_N>` for N < extra_ids, id pieces + extra_ids - 1 - N) is that
    token wherever it stands; sentencepiece encodes the text between them."""

    kind = "sentencepiece"
    offset = 0

    def __init__(self, model_file: str | Path, max_length: int, pad_id: int = 0, eos_id: int = 1, extra_ids: int = 0):
        super().__init__(max_length)
        import sentencepiece

        self.model_file = Path(model_file)
        self.processor = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        self.pad_id, self.eos_id, self.extra_ids = pad_id, eos_id, extra_ids
        self.pieces = self.processor.get_piece_size()
        self.vocab_size = self.pieces + extra_ids
        self.special = {self.processor.id_to_piece(i): i for i in (pad_id, eos_id, self.processor.unk_id())}
        # longest first: Python's regex takes the first alternative that matches, transformers the longest;
        # N has no leading zero and fewer than 11 digits (ids stay below 2**31)
        names = "|".join(re.escape(t) for t in sorted(self.special, key=len, reverse=True))
        self.pattern = re.compile(rf"{names}|<extra_id_(0|[1-9][0-9]{{0,9}})>")
        # tokenizers splits words on White_Space after normalization, sentencepiece only on " ": the
        # White_Space characters the normalizer keeps must become " " for sentencepiece
        kept = [c for c in WHITE_SPACE if c in "".join(self.processor.encode(f"a{c}b", out_type=str))]
        self.spaces = str.maketrans(dict.fromkeys(kept, " "))

    def special_id(self, match: re.Match) -> int | None:
        if match.group(1) is None:
            return self.special[match.group()]
        n = int(match.group(1))
        return self.pieces + self.extra_ids - 1 - n if n < self.extra_ids else None

    def ids(self, text: str) -> list[int]:
        ids, start = [], 0
        for match in self.pattern.finditer(text):
            special = self.special_id(match)
            if special is None:  # <extra_id_N> with N >= extra_ids is text
                continue
            ids += self.processor.encode(text[start : match.start()].translate(self.spaces))
            ids.append(special)
            start = match.end()
        return ids + self.processor.encode(text[start:].translate(self.spaces))

    def to_dict(self) -> dict:
        return {**super().to_dict(), "extra_ids": self.extra_ids, "files": {"spiece.model": {}}}


def _read_json(file: Path):
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TextEncoderError(f"cannot read {file}: {error}") from error


def _is_transformers_tokenizer(data) -> bool:
    return isinstance(data, dict) and isinstance(data.get("model"), dict) and "added_tokens" in data


def read_settings(path: Path) -> dict | None:
    """This project's tokenizer settings in the folder `path` (imagen_tokenizer.json, or tokenizer.json
    as run directories kept them before); None for a transformers folder, which has none."""
    for name in (TOKENIZER_FILE, OLD_TOKENIZER_FILE):
        file = path / name
        if not file.is_file():
            continue
        data = _read_json(file)
        if name == OLD_TOKENIZER_FILE and _is_transformers_tokenizer(data):
            return None
        if not isinstance(data, dict) or data.get("kind") not in KINDS:
            raise TextEncoderError(
                f"{file} is neither this project's tokenizer settings (kind: {' or '.join(KINDS)}) "
                "nor a transformers tokenizer.json; remove it or save the folder again"
            )
        for key in ("max_length", "extra_ids"):
            value = data.get(key, 0)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise TextEncoderError(f"{file}: {key} is {value!r}; expected a non-negative integer")
        return data
    return None


def transformers_extra_ids(path: Path, tokenizer: SentencePieceTokenizer) -> int:
    """How many `<extra_id_N>` tokens transformers' T5 tokenizer has for the folder: those its
    tokenizer.json adds, else tokenizer_config.json's `extra_ids`, else 100 (its default)."""
    file = path / OLD_TOKENIZER_FILE
    data = _read_json(file) if file.is_file() else None
    if _is_transformers_tokenizer(data):
        added = {t.get("content"): t.get("id") for t in data["added_tokens"] if isinstance(t, dict)}
        extras = {t: i for t, i in added.items() if EXTRA_ID.fullmatch(str(t))}
        others = sorted(str(t) for t in added if t not in extras and t not in tokenizer.special)
        pieces = tokenizer.pieces
        if others or any(i != pieces + len(extras) - 1 - int(EXTRA_ID.fullmatch(t)[1]) for t, i in extras.items()):
            raise TextEncoderError(
                f"{file} adds tokens unlike T5's tokenizer ({', '.join(others) or 'extra ids'}); "
                f"this project reproduces only <extra_id_N> with id {pieces} + count - 1 - N"
            )
        return len(extras)
    config = path / HF_TOKENIZER_CONFIG
    value = _read_json(config).get("extra_ids", T5_EXTRA_IDS) if config.is_file() else T5_EXTRA_IDS
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise TextEncoderError(f"{config}: extra_ids is {value!r}; expected a non-negative integer")
    return value


def folder_tokenizer(path: Path, settings: dict | None, max_length: int | None, vocab_size: int) -> ByteTokenizer:
    """The tokenizer of a text encoder folder whose model has `vocab_size` embeddings. T5's extra ids
    are kept only where the embedding has room for them (transformers' ids would be out of range)."""
    if settings is not None and settings["kind"] == "byte":
        return ByteTokenizer(max_length or settings.get("max_length", 0))
    spiece = path / "spiece.model"
    if not spiece.is_file():
        raise TextEncoderError(
            f"{path} has no spiece.model; a T5 folder needs its sentencepiece vocabulary (the "
            "tokenizer's save_pretrained in transformers 5 does not write it): copy it from the "
            "model's repository, e.g. huggingface_hub.hf_hub_download(name, 'spiece.model', "
            "local_dir=folder)"
        )
    length = max_length or (settings or {}).get("max_length", DEFAULT_MAX_LENGTH)
    plain = SentencePieceTokenizer(spiece, length)
    has_own = settings is not None and "extra_ids" in settings
    extra_ids = settings["extra_ids"] if has_own else transformers_extra_ids(path, plain)
    if extra_ids == 0 or plain.pieces + extra_ids > vocab_size:
        return plain
    return SentencePieceTokenizer(spiece, length, extra_ids=extra_ids)


def _quiet_transformers() -> None:
    """transformers shows progress bars when loading and saving; library calls stay quiet."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def tiny_t5_config(vocab_size: int = 384, d_model: int = 128, num_layers: int = 2, num_heads: int = 4):
    from transformers import T5Config

    return T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=d_model // num_heads,
        d_ff=2 * d_model,
        num_layers=num_layers,
        num_heads=num_heads,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
    )


class TextEncoder(nn.Module):
    """T5 encoder + tokenizer; `forward(input_ids, attention_mask) -> text_embeds` is the exported stage.
    `zero_padding=False` keeps the embeddings at padding positions (DeepFloyd IF's Unets read every one)."""

    def __init__(self, model, tokenizer: ByteTokenizer, *, zero_padding: bool = True):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.zero_padding = zero_padding
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
        """Loads a folder written by `save` (or by it before, with tokenizer.json for its settings), or a
        T5 folder written by transformers' `save_pretrained` (config.json, weights, spiece.model, with or
        without tokenizer.json and tokenizer_config.json)."""
        from transformers import T5EncoderModel

        path = Path(path)
        if not (path / "config.json").is_file():
            raise TextEncoderError(
                f"{path} is not a T5 folder (no config.json); pass a folder saved with "
                "save_pretrained, e.g. a local copy of t5-small"
            )
        settings = read_settings(path)
        _quiet_transformers()
        try:
            model = T5EncoderModel.from_pretrained(path, attn_implementation="eager")
        except Exception as error:  # transformers raises many kinds; name the folder
            raise TextEncoderError(f"could not load a T5 encoder from {path}: {error}") from error
        tokenizer = folder_tokenizer(path, settings, max_length, model.config.vocab_size)
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
        if not self.zero_padding:
            return hidden
        return hidden * attention_mask[:, :, None].to(hidden.dtype)

    @torch.no_grad()
    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """text_embeds (b, L, d) float32 and text_mask (b, L) bool."""
        input_ids, attention_mask, _ = self.tokenizer(texts)
        input_ids, attention_mask = torch.from_numpy(input_ids), torch.from_numpy(attention_mask)
        return self.forward(input_ids, attention_mask), attention_mask.bool()
