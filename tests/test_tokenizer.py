"""Tokenizers: the runtime's byte and SentencePiece tokenizers against the reference's, the
reference's byte tokenizer against ByT5's, prompt validation, and truncation of long prompts
(deterministic, reported in `result.info`, or an error in strict mode)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imagen.runtime.errors import PromptError
from imagen.runtime.tokenizer import Tokenizer

from bundles import LENGTH, fake_pipeline, make_bundle

PROMPTS = [
    "a red circle",
    "Ünïcödé façade – 日本語の文 🎨🖌️",
    "x",
    "tab\tand\nnewline",
    "a" * 23,
    "a" * 24,
    "b" * 200,
    "ümlaut " * 10,
    "  leading and trailing  ",
]


@pytest.mark.parametrize("length", [2, 8, 24, 64])
def test_byte_tokenizer_matches_reference_token_for_token(length):
    from imagen.reference.text_encoder import ByteTokenizer

    reference = ByteTokenizer(length)
    runtime = Tokenizer("byte", length)
    ids, mask, truncated = runtime(PROMPTS)
    ref_ids, ref_mask, ref_truncated = reference(PROMPTS)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(mask, ref_mask)
    assert truncated == ref_truncated
    assert ids.dtype == np.int64 and mask.dtype == np.int64 and ids.shape == (len(PROMPTS), length)
    # the long prompts are cut and say so; a prompt of exactly L - 1 bytes is not
    expected = [len(p.encode("utf-8")) > length - 1 for p in PROMPTS]
    assert truncated == expected
    if length == 24:
        assert truncated[PROMPTS.index("a" * 23)] is False and truncated[PROMPTS.index("a" * 24)] is True


def test_sentencepiece_tokenizer_matches_reference(tmp_path):
    sentencepiece = pytest.importorskip("sentencepiece")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(
        "\n".join(
            [
                "a red circle on a blue square",
                "two green triangles",
                "a small yellow star",
                "the big purple hexagon left of the circle",
            ]
            * 50
        )
    )
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(tmp_path / "spiece"),
        vocab_size=30,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        minloglevel=3,
    )
    from imagen.reference.text_encoder import SentencePieceTokenizer

    reference = SentencePieceTokenizer(tmp_path / "spiece.model", 12)
    runtime = Tokenizer("sentencepiece", 12, model_file=tmp_path / "spiece.model")
    prompts = ["a red circle", "two green triangles on a big purple hexagon left of the circle", "ünknown"]
    for got, want in zip(runtime(prompts), reference(prompts), strict=False):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize(
    "prompt,reason",
    [
        ("", "empty"),
        ("   \n\t", "empty"),
        ("bad \ud800 surrogate", "surrogate"),
        ("bell \x07", "control"),
        ("nul \x00", "control"),
        ("del \x7f", "control"),
        ("c1 \x85", "control"),
        ("cr \r", "control"),
        (b"bytes", "bytes"),
        (None, "str"),
        (12, "str"),
    ],
)
def test_bad_prompts_raise_prompt_error(prompt, reason):
    with pytest.raises(PromptError, match=reason):
        Tokenizer("byte", 16)([prompt])


def test_strict_rejects_long_prompt_and_default_truncates():
    tokenizer = Tokenizer("byte", 8)
    with pytest.raises(PromptError, match="at most 7"):
        tokenizer(["a long prompt"], strict=True)
    ids, mask, truncated = tokenizer(["a long prompt"])
    assert truncated == [True] and ids[0, -1] == 1 and mask.sum() == 8
    assert tokenizer(["short"], strict=True)[2] == [False]


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.text(max_size=40),
        st.text(st.characters(blacklist_categories=()), max_size=20),
        st.binary(max_size=8),
        st.integers(),
        st.none(),
        st.lists(st.text(max_size=3), max_size=2),
    )
)
def test_any_input_tokenizes_or_raises_prompt_error(prompt):
    tokenizer = Tokenizer("byte", 16)
    try:
        ids, mask, truncated = tokenizer([prompt])
    except PromptError:
        return
    assert isinstance(prompt, str) and prompt.strip()
    np.testing.assert_array_equal(ids, _reference_byte_tokenizer(16)([prompt])[0])
    n = int(mask.sum())
    assert 2 <= n <= 16 and mask[0, :n].all() and not mask[0, n:].any()
    assert ids[0, n - 1] == 1 and (ids[0, n:] == 0).all() and (ids[0, : n - 1] >= 3).all()
    assert (ids[0, : n - 1] < 259).all()
    assert truncated == [len(prompt.encode("utf-8")) > 15]


def _reference_byte_tokenizer(length):
    from imagen.reference.text_encoder import ByteTokenizer

    return ByteTokenizer(length)


def test_byte_tokenizer_follows_byt5():
    from transformers import ByT5Tokenizer

    from imagen.reference.text_encoder import ByteTokenizer

    ours = ByteTokenizer(12)
    theirs = ByT5Tokenizer()
    prompts = ["a red circle", "héllo wörld ✓", "x" * 30, ""]
    ids, mask, truncated = ours(prompts)
    assert truncated == [True, True, True, False]
    for row, prompt in enumerate(prompts):
        expected = theirs(prompt, max_length=12, truncation=True, padding="max_length")
        assert ids[row].tolist() == expected["input_ids"], prompt
        assert mask[row].tolist() == expected["attention_mask"], prompt


def test_long_prompts_truncate_deterministically_and_say_so(tmp_path):
    pipe = fake_pipeline(make_bundle(tmp_path / "bundle"))
    head = "a" * (LENGTH - 1)
    result = pipe([head + "b", head + "c" * 50, "short"], steps=2, seed=3)
    assert [i["truncated"] for i in result.info] == [True, True, False]
    cut = pipe(head + "b", steps=2, seed=3)
    assert cut.info[0]["truncated"] is True
    for prompt in (head + "c" * 50, head + "d" * 500, head):  # the same tokens after the cut: the same image
        np.testing.assert_array_equal(pipe(prompt, steps=2, seed=3).array, cut.array)
    with pytest.raises(PromptError, match=rf"prompt 0 .* at most {LENGTH - 1}"):
        pipe(head + "b", steps=2, seed=3, strict=True)
    assert pipe(head, steps=2, seed=3, strict=True).info[0]["truncated"] is False
