"""Tokenizers of the bundle (docs/bundle.md, Tokenization), without torch or transformers.

`byte`: ids are the prompt's UTF-8 bytes + `offset` (ByT5's convention); `sentencepiece`:
the ids transformers' T5 tokenizer gives, from `tokenizer/spiece.model` (the `sentencepiece`
package is imported only then): special-token text first, sentencepiece on the text between.
Either way ids are cut to L - 1 (reported per prompt as truncated), then eos, then pad
up to L; the attention mask is 1 on the ids and the eos.
"""

import re
from pathlib import Path

import numpy as np

from .errors import BundleError, PromptError

ALLOWED_CONTROLS = frozenset("\t\n")
# Unicode White_Space (Rust's char::is_whitespace): the tokenizers library splits words on these
WHITE_SPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000" + "".join(map(chr, range(0x2000, 0x200B)))


def _preview(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def validate_prompt(prompt, index: int = 0, allow_empty: bool = False) -> str:
    """The prompt if it can be tokenized, else PromptError saying why. `allow_empty`: "" and whitespace
    pass (a negative prompt, or a prompt that preprocessing emptied, is encoded as eos alone)."""
    where = f"prompt {index}"
    if isinstance(prompt, (bytes, bytearray, memoryview)):
        raise PromptError(f"{where} is {type(prompt).__name__}, not str; decode it first (e.g. data.decode('utf-8'))")
    if not isinstance(prompt, str):
        raise PromptError(f"{where} must be a str, got {type(prompt).__name__}")
    if not allow_empty and not prompt.strip():
        raise PromptError(f"{where} is empty or whitespace only; give some text")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as error:
        raise PromptError(
            f"{where} is not valid Unicode text (lone surrogate {prompt[error.start]!r} at "
            f"position {error.start}); pass properly decoded text"
        ) from None
    for position, char in enumerate(prompt):
        code = ord(char)
        if (code < 0x20 or 0x7F <= code <= 0x9F) and char not in ALLOWED_CONTROLS:
            raise PromptError(
                f"{where} contains the control character {char!r} at position {position}; "
                "remove it (only tab and newline are allowed)"
            )
    return prompt


class Tokenizer:
    """`tokenizer(prompts) -> (input_ids int64 (B, L), attention_mask int64 (B, L), truncated list[bool])`."""

    def __init__(
        self,
        kind: str,
        max_length: int,
        pad_id: int = 0,
        eos_id: int = 1,
        offset: int = 3,
        model_file: str | Path | None = None,
        extra_ids: int = 0,
    ):
        if kind not in ("byte", "sentencepiece"):
            raise BundleError(f"unknown tokenizer kind {kind!r}; this runtime knows 'byte' and 'sentencepiece'")
        if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 2:
            raise BundleError(f"text max_length must be an integer >= 2, got {max_length!r}")
        self.kind, self.max_length = kind, max_length
        self.pad_id, self.eos_id, self.offset = int(pad_id), int(eos_id), int(offset)
        self._processor = None
        if kind == "sentencepiece":
            if model_file is None:
                raise BundleError("a sentencepiece tokenizer needs tokenizer/spiece.model in the bundle")
            try:
                import sentencepiece
            except ImportError as error:
                raise BundleError(
                    "this bundle uses a sentencepiece vocabulary; install it with "
                    "pip install 'imagen-cascade[sentencepiece]'"
                ) from error
            try:
                self._processor = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
            except (OSError, RuntimeError) as error:
                raise BundleError(f"cannot load {model_file}: {error}; re-export the bundle") from error
            self._special_tokens(int(extra_ids))

    def _special_tokens(self, extra_ids: int) -> None:
        """T5's special tokens as transformers matches them in the text: the pad, eos and unk pieces,
        and `<extra_id_N>` for N < extra_ids with id pieces + extra_ids - 1 - N."""
        processor = self._processor
        self._extra_ids, self._pieces = extra_ids, processor.get_piece_size()
        self._special = {processor.id_to_piece(i): i for i in (self.pad_id, self.eos_id, processor.unk_id())}
        # longest first: Python's regex takes the first alternative that matches, transformers the longest;
        # N has no leading zero and fewer than 11 digits (ids stay below 2**31)
        names = "|".join(re.escape(t) for t in sorted(self._special, key=len, reverse=True))
        self._pattern = re.compile(rf"{names}|<extra_id_(0|[1-9][0-9]{{0,9}})>")
        # tokenizers splits words on White_Space after normalization, sentencepiece only on " ": the
        # White_Space characters the normalizer keeps must become " " for sentencepiece
        kept = [c for c in WHITE_SPACE if c in "".join(processor.encode(f"a{c}b", out_type=str))]
        self._spaces = str.maketrans(dict.fromkeys(kept, " "))

    def _special_id(self, match: re.Match) -> int | None:
        if match.group(1) is None:
            return self._special[match.group()]
        n = int(match.group(1))
        return self._pieces + self._extra_ids - 1 - n if n < self._extra_ids else None

    @classmethod
    def from_bundle(cls, bundle) -> "Tokenizer":
        """The tokenizer a verified bundle (`imagen.runtime.bundle.Bundle`) names."""
        spec = bundle.manifest.tokenizer
        model_file = None
        if spec.kind == "sentencepiece":
            entry = spec.files.get("spiece.model")
            model_file = bundle.path(entry) if entry else bundle.root / "tokenizer" / "spiece.model"
        return cls(
            spec.kind, bundle.manifest.max_length, spec.pad_id, spec.eos_id, spec.offset, model_file, spec.extra_ids
        )

    def ids(self, prompt: str) -> list[int]:
        if self._processor is None:
            return [b + self.offset for b in prompt.encode("utf-8")]
        ids, start = [], 0
        for match in self._pattern.finditer(prompt):
            special = self._special_id(match)
            if special is None:  # <extra_id_N> with N >= extra_ids is text
                continue
            ids += self._processor.encode(prompt[start : match.start()].translate(self._spaces))
            ids.append(special)
            start = match.end()
        return [int(i) for i in ids + self._processor.encode(prompt[start:].translate(self._spaces))]

    def __call__(
        self, prompts: list[str], strict: bool = False, allow_empty: bool = False
    ) -> tuple[np.ndarray, np.ndarray, list[bool]]:
        if isinstance(prompts, str):
            prompts = [prompts]
        length = self.max_length
        input_ids = np.full((len(prompts), length), self.pad_id, dtype=np.int64)
        attention_mask = np.zeros((len(prompts), length), dtype=np.int64)
        truncated = []
        for row, prompt in enumerate(prompts):
            ids = self.ids(validate_prompt(prompt, row, allow_empty))
            cut = len(ids) > length - 1
            if cut and strict:
                raise PromptError(
                    f"prompt {row} {_preview(prompt)} is {len(ids)} tokens; at most {length - 1} "
                    "fit (plus eos); shorten it or drop strict to truncate"
                )
            truncated.append(cut)
            ids = ids[: length - 1] + [self.eos_id]
            input_ids[row, : len(ids)] = ids
            attention_mask[row, : len(ids)] = 1
        return input_ids, attention_mask, truncated
