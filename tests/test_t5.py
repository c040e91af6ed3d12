"""T5 text encoders as users have them: folders written by transformers' `save_pretrained`, their
tokenizer against transformers' own on a generated corpus, and encoders at the real T5 sizes
exported with FP32 parity.

Everything is made offline: the sentencepiece vocabulary is trained here on a small caption text,
the encoders have random weights and configs written from the published ones.
"""

import json
import random
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoTokenizer, T5Config, T5EncoderModel, T5Tokenizer

from imagen.export.bundle import TOLERANCE
from imagen.export.cli import main as export_cli
from imagen.export.onnx_export import TextEncoderStage, export_stage
from imagen.export.parity import measure_parity
from imagen.reference.text_encoder import (
    OLD_TOKENIZER_FILE,
    TOKENIZER_FILE,
    ByteTokenizer,
    SentencePieceTokenizer,
    TextEncoder,
    TextEncoderError,
    tiny_t5_config,
)
from imagen.runtime.bundle import load_bundle
from imagen.runtime.contract import text_encoder_signature
from imagen.runtime.tokenizer import Tokenizer

from runs import write_minimagen_directory

EXTRA_IDS = 100  # transformers' T5 default
MAX_LENGTH = 64  # the long lines and some others (a fifth of the corpus) are truncated
FP32_TOLERANCE = 1e-5

STYLES = ["a photo of", "a watercolor painting of", "an oil painting of", "a sketch of", "a 3d render of"]
ADJECTIVES = "red blue green yellow purple tiny huge fluffy shiny old wooden glass golden rusty sleepy".split()
NOUNS = "cat dog house tree car robot castle mountain river flower bird teapot astronaut lighthouse".split()
NOUNS += "horse bicycle window bridge boat cloud sunset child woman man chair lamp book clock apple cake".split()
PLACES = "table beach forest city street moon desert garden kitchen ocean snow field rooftop".split()
# the training text also holds every printable ASCII character once a line, so unk comes from RARE only
ASCII = "".join(map(chr, range(33, 127)))
UNICODE_WORDS = "café naïve crème brûlée façade Ångström Straße jalapeño 東京 夜景 猫 桜 寿司 🐱 🌸 🚀".split()
UNICODE_WORDS += "кошка 고양이 ελιά".split()
# characters the vocabulary never saw (unk, alone or in a row), or that NFKC rewrites
RARE = ["🦜", "¤¤", "𝔘𝔫", "ǅ", "\u00ad", "¨", "e\u0301", "ﬁ", "①", "ＡＢＣ", "½", "👩\u200d🚀", "İı", "…", "“q”", "C++"]
SPACES = [" ", "  ", "   ", "\t", "\n", " \n ", "\t\t", "\u00a0", "\u3000", "\u2028", "\u202f", "\u2003", "\u200b"]
SPECIAL = [
    "</s>",
    "<pad>",
    "<unk>",
    "<extra_id_0>",
    "<extra_id_1>",
    "<extra_id_10>",
    "<extra_id_99>",
    "</s></s>",
    "<extra_id_100>",
    "</s",
    "<extra_id_>",
    "<extra_id_-1>",
    "<extra_id_007>",
    "<EXTRA_ID_0>",
    "<s>",
    "<<pad>>",
    "<pad",
    "s>",
    "extra_id_5>",
    "▁",
    "▁▁",
]
EDGES = [
    "</s>",
    "<pad>",
    "<unk>",
    "<extra_id_0>",
    "<extra_id_99>",
    "a</s>b",
    "a </s> b",
    "<extra_id_1<extra_id_1>>",
    "<extra_id_0><extra_id_0>",
    " </s> ",
    "cat\t<pad>\ncat",
    "▁cat",
    "▁▁a",
    "<\u200b/s>",
    "x y z Q",
    "<extra_id_1000000000>",
    "<extra_id_123456789012>",
]


def caption(rng: random.Random) -> str:
    return f"{rng.choice(STYLES)} a {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} on the {rng.choice(PLACES)}"


def training_text(rng: random.Random) -> str:
    words = ADJECTIVES + NOUNS + PLACES + UNICODE_WORDS
    return "\n".join(f"{caption(rng)} {' '.join(rng.choices(words, k=rng.randint(0, 6)))} {ASCII}" for _ in range(3000))


def _unicode(rng, words):
    words = [w + rng.choice(RARE) if rng.random() < 0.25 else w for w in words]
    return " ".join(words[:3] + rng.sample(UNICODE_WORDS, 2) + words[3:] + [rng.choice(RARE)])


def _specials(rng, words):
    parts = []
    for word in words:
        parts += [word] + ([rng.choice(SPECIAL)] if rng.random() < 0.4 else [])
    return "".join(p + rng.choice(["", "", " ", "  ", "\t"]) for p in parts)


CASES = {
    "plain": lambda rng, words: " ".join(words),
    "unicode": _unicode,
    "whitespace": lambda rng, words: rng.choice(SPACES) + "".join(w + rng.choice(SPACES) for w in words),
    "long": lambda rng, words: " ".join(caption(rng) for _ in range(rng.randint(3, 8))),
    "specials": _specials,
    "specials at the ends": lambda rng, words: f"{rng.choice(SPECIAL)} {' '.join(words)}{rng.choice(SPECIAL)}",
    "everything": lambda rng, words: _specials(rng, _unicode(rng, words).split()).replace(" ", rng.choice(SPACES)),
}


def corpus(lines_per_case: int = 60, seed: int = 1) -> list[str]:
    """Plain captions, unicode, odd whitespace, text over MAX_LENGTH tokens and special-token text:
    prompts the runtime accepts (tab and newline are the only controls)."""
    rng = random.Random(seed)
    lines = [make(rng, caption(rng).split()) for make in CASES.values() for _ in range(lines_per_case)]
    return EDGES + lines


@pytest.fixture(scope="module")
def spiece(tmp_path_factory):
    import sentencepiece as spm

    root = tmp_path_factory.mktemp("spiece")
    (root / "text.txt").write_text(training_text(random.Random(0)), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(root / "text.txt"),
        model_prefix=str(root / "spiece"),
        vocab_size=400,
        hard_vocab_limit=False,
        model_type="unigram",
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        minloglevel=2,
    )
    return root / "spiece.model"


def save_t5_folder(path, spiece, embed_dim=32, tokenizer_files=True):
    """A T5 folder as `save_pretrained` writes it: config.json, model.safetensors, spiece.model and,
    with `tokenizer_files`, the tokenizer's tokenizer.json and tokenizer_config.json."""
    import sentencepiece as spm

    pieces = spm.SentencePieceProcessor(model_file=str(spiece)).get_piece_size()
    torch.manual_seed(0)
    T5EncoderModel(tiny_t5_config(vocab_size=pieces + EXTRA_IDS, d_model=embed_dim)).save_pretrained(path)
    shutil.copyfile(spiece, path / "spiece.model")
    if tokenizer_files:
        T5Tokenizer.from_pretrained(path).save_pretrained(path)  # converts spiece.model as users' folders were
    return path


@pytest.fixture(scope="module")
def t5_folders(spiece, tmp_path_factory):
    root = tmp_path_factory.mktemp("t5")
    full = save_t5_folder(root / "full", spiece)
    assert {"config.json", "model.safetensors", "spiece.model", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in full.iterdir()
    }
    return {"full": full, "spiece only": save_t5_folder(root / "spiece", spiece, tokenizer_files=False)}


def transformers_ids(folder, lines, max_length):
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert isinstance(tokenizer, T5Tokenizer)
    out = tokenizer(lines, max_length=max_length, truncation=True, padding="max_length")
    return np.array(out["input_ids"]), np.array(out["attention_mask"])


@pytest.mark.parametrize("variant", ["full", "spiece only"])
def test_tokenizers_give_transformers_ids_and_masks(t5_folders, variant):
    folder, lines = t5_folders[variant], corpus()
    encoder = TextEncoder.from_folder(folder, max_length=MAX_LENGTH)
    reference = encoder.tokenizer
    assert isinstance(reference, SentencePieceTokenizer) and reference.extra_ids == EXTRA_IDS
    runtime = Tokenizer("sentencepiece", MAX_LENGTH, model_file=folder / "spiece.model", extra_ids=EXTRA_IDS)
    expected_ids, expected_mask = transformers_ids(folder, lines, MAX_LENGTH)
    whole_ids, whole_mask = transformers_ids(folder, lines, 512)
    lengths = whole_mask.sum(1)  # ids + eos, untruncated
    for name, tokenizer in (("reference", reference), ("runtime", runtime)):
        ids, mask, truncated = tokenizer(lines)
        wrong = [line for line, a, b in zip(lines, ids, expected_ids) if not np.array_equal(a, b)]
        assert not wrong, f"{name}: {len(wrong)} of {len(lines)} lines differ, e.g. {wrong[:3]!r}"
        np.testing.assert_array_equal(mask, expected_mask)
        assert truncated == [int(n) > MAX_LENGTH for n in lengths]
    print(f"{variant}: {len(lines)} lines equal to transformers', {sum(truncated)} truncated")
    # the corpus exercises the special-token rule: sentencepiece alone gets many lines wrong
    plain = [reference.processor.encode(t) + [1] for t in lines]
    differ = sum(p != row[:n].tolist() for p, row, n in zip(plain, whole_ids, lengths))
    print(f"{variant}: sentencepiece alone differs on {differ} lines")
    assert differ > len(lines) // 4 and sum(truncated) > len(lines) // 10


def test_untruncated_ids_and_whitespace_controls_match_transformers(t5_folders):
    """Whole ids (no truncation), and the controls the runtime refuses but training captions may
    hold (\\r, \\v, \\f, U+0085 NEL): transformers splits words on all of Unicode's White_Space."""
    folder = t5_folders["full"]
    lines = corpus(lines_per_case=20, seed=2) + [
        "a\rcat",
        "a\r\ncat",
        "a\x0bcat",
        "a\x0ccat",
        "a\x85cat",
        "\x85</s>\x85cat\x85",
        "a\x1ccat",
    ]
    reference = SentencePieceTokenizer(folder / "spiece.model", 512, extra_ids=EXTRA_IDS)
    expected, _ = transformers_ids(folder, lines, 512)
    np.testing.assert_array_equal(reference(lines)[0], expected)


def test_special_token_text_gets_special_ids(t5_folders):
    runtime = Tokenizer("sentencepiece", 16, model_file=t5_folders["full"] / "spiece.model", extra_ids=EXTRA_IDS)
    pieces = runtime._processor.get_piece_size()
    assert runtime.ids("<extra_id_0>") == [pieces + 99] and runtime.ids("<extra_id_99>") == [pieces]
    assert runtime.ids("</s><pad><unk>") == [1, 0, 2]
    assert runtime.ids("a</s>") == runtime.ids("a") + [1]
    assert 1 not in runtime.ids("</s") and pieces not in runtime.ids("<extra_id_100>")
    none = Tokenizer("sentencepiece", 16, model_file=t5_folders["full"] / "spiece.model")
    assert max(none.ids("<extra_id_0>")) < pieces
    many = Tokenizer("sentencepiece", 16, model_file=t5_folders["full"] / "spiece.model", extra_ids=2**30)
    assert many.ids("<extra_id_5>") == [pieces + 2**30 - 6]  # no table of 2**30 names is built


def test_save_pretrained_folder_loads_saves_and_reloads(t5_folders, tmp_path):
    encoder = TextEncoder.from_folder(t5_folders["full"], max_length=16)
    embeds, mask = encoder.encode(["a red cat <extra_id_0>", "東京 🐱"])
    assert embeds.shape == (2, 16, 32) and torch.isfinite(embeds).all()
    encoder.save(tmp_path / "te")
    assert (tmp_path / "te" / TOKENIZER_FILE).is_file() and not (tmp_path / "te" / OLD_TOKENIZER_FILE).exists()
    settings = json.loads((tmp_path / "te" / TOKENIZER_FILE).read_text())
    assert settings["kind"] == "sentencepiece" and settings["extra_ids"] == EXTRA_IDS
    loaded = TextEncoder.from_folder(tmp_path / "te")
    assert loaded.tokenizer.extra_ids == EXTRA_IDS and loaded.max_length == 16
    assert torch.equal(loaded.encode(["a red cat <extra_id_0>", "東京 🐱"])[0], embeds)


@pytest.mark.parametrize("kind", ["byte", "sentencepiece"])
def test_run_directory_written_before_still_loads(t5_folders, tmp_path, kind):
    """Run directories kept this project's tokenizer settings in text_encoder/tokenizer.json."""
    if kind == "byte":
        TextEncoder.tiny(seed=1, max_length=12).save(tmp_path / "te")
    else:
        TextEncoder.from_folder(t5_folders["spiece only"], max_length=12).save(tmp_path / "te")
    old = json.loads((tmp_path / "te" / TOKENIZER_FILE).read_text())
    old.pop("extra_ids", None)  # not written before
    (tmp_path / "te" / TOKENIZER_FILE).unlink()
    (tmp_path / "te" / OLD_TOKENIZER_FILE).write_text(json.dumps(old))
    loaded = TextEncoder.from_folder(tmp_path / "te")
    assert loaded.tokenizer.kind == kind and loaded.max_length == 12
    assert loaded.tokenizer.extra_ids == (EXTRA_IDS if kind == "sentencepiece" else 0)  # transformers' default


@pytest.mark.parametrize(
    "content, match",
    [
        ("{not json", "cannot read"),
        ('{"version": "1.0"}', "neither"),
        ('{"kind": "wordpiece", "max_length": 8}', "neither"),
        ('["kind"]', "neither"),
        ('{"kind": "byte", "max_length": "8"}', "max_length"),
    ],
)
def test_unrecognised_tokenizer_json_is_a_typed_error_naming_the_file(t5_folders, tmp_path, content, match):
    folder = shutil.copytree(t5_folders["spiece only"], tmp_path / "t5")
    (folder / OLD_TOKENIZER_FILE).write_text(content)
    with pytest.raises(TextEncoderError, match=match) as error:
        TextEncoder.from_folder(folder)
    assert str(folder / OLD_TOKENIZER_FILE) in str(error.value)


def test_folder_without_spiece_model_says_where_to_get_it(t5_folders, tmp_path):
    folder = shutil.copytree(t5_folders["full"], tmp_path / "t5")
    (folder / "spiece.model").unlink()  # as transformers 5's tokenizer save_pretrained leaves it
    with pytest.raises(TextEncoderError, match="no spiece.model.*hf_hub_download"):
        TextEncoder.from_folder(folder)


def test_tokenizer_json_with_tokens_t5_does_not_have_is_refused(t5_folders, tmp_path):
    folder = shutil.copytree(t5_folders["full"], tmp_path / "t5")
    data = json.loads((folder / OLD_TOKENIZER_FILE).read_text())
    data["added_tokens"].append({**data["added_tokens"][0], "id": len(data["model"]["vocab"]), "content": "<sep>"})
    (folder / OLD_TOKENIZER_FILE).write_text(json.dumps(data))
    with pytest.raises(TextEncoderError, match="<sep>"):
        TextEncoder.from_folder(folder)


def test_extra_ids_follow_tokenizer_config_and_need_room_in_the_embedding(t5_folders, spiece, tmp_path):
    folder = shutil.copytree(t5_folders["spiece only"], tmp_path / "t5")
    (folder / "tokenizer_config.json").write_text(json.dumps({"extra_ids": 10}))
    assert TextEncoder.from_folder(folder).tokenizer.extra_ids == 10
    small = tmp_path / "small"
    T5EncoderModel(tiny_t5_config(vocab_size=SentencePieceTokenizer(spiece, 8).vocab_size)).save_pretrained(small)
    shutil.copyfile(spiece, small / "spiece.model")
    assert TextEncoder.from_folder(small).tokenizer.extra_ids == 0  # transformers' ids would be out of range


def test_minimagen_run_exports_fp16_with_a_save_pretrained_t5(t5_folders, tmp_path):
    """The T5 folder has transformers' tokenizer.json beside it; the encoder stays FP32 in an FP16 bundle."""
    write_minimagen_directory(tmp_path / "training", t5_folders["full"])
    result = CliRunner().invoke(
        export_cli,
        [
            "--ckpt",
            str(tmp_path / "training"),
            "--text-encoder",
            str(t5_folders["full"]),
            "--out",
            str(tmp_path / "b"),
            "--fp16",
            "--max-batch",
            "2",
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    bundle = load_bundle(tmp_path / "b")
    tokenizer = bundle.manifest.tokenizer
    assert tokenizer.kind == "sentencepiece" and tokenizer.extra_ids == EXTRA_IDS
    encoder = bundle.manifest.stages["text_encoder"]
    assert encoder.precision == "fp32" and encoder.parity.tolerance == TOLERANCE["fp32"] and encoder.parity.passed
    assert max(encoder.parity.rel_error) <= FP32_TOLERANCE
    assert {s.precision for name, s in bundle.manifest.stages.items() if name != "text_encoder"} == {"fp16"}
    lines = corpus(lines_per_case=10, seed=3)
    expected, _ = transformers_ids(t5_folders["full"], lines, bundle.manifest.max_length)
    np.testing.assert_array_equal(Tokenizer.from_bundle(bundle)(lines)[0], expected)


def test_byte_bundle_manifest_has_no_extra_ids(bundle_fp16):
    manifest = json.loads((bundle_fp16 / "manifest.json").read_text())
    assert manifest["tokenizer"]["kind"] == "byte" and "extra_ids" not in manifest["tokenizer"]
    assert manifest["stages"]["text_encoder"]["precision"] == "fp32"


# The published configs (vocab_size 32128, relative_attention_num_buckets 32); v1.1 has gated-GELU
# feed-forward layers and embeddings untied from the (absent here) language-model head.
T5_SIZES = {
    "t5-small": dict(d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8, feed_forward_proj="relu"),
    "t5-base": dict(d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12, feed_forward_proj="relu"),
    "t5-large": dict(d_model=1024, d_kv=64, d_ff=4096, num_layers=24, num_heads=16, feed_forward_proj="relu"),
    "t5-v1_1-base": dict(
        d_model=768,
        d_kv=64,
        d_ff=2048,
        num_layers=12,
        num_heads=12,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
    ),
    "t5-v1_1-large": dict(
        d_model=1024,
        d_kv=64,
        d_ff=2816,
        num_layers=24,
        num_heads=16,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
    ),
}
T5_VOCAB = 32128
SLOW = pytest.mark.slow  # over two minutes each on 2 CPU cores, 6 GB of memory


@pytest.mark.parametrize(
    "name",
    [
        "t5-small",
        "t5-base",
        "t5-v1_1-base",
        pytest.param("t5-large", marks=SLOW),
        pytest.param("t5-v1_1-large", marks=SLOW),
    ],
)
def test_t5_at_real_sizes_exports_with_fp32_parity(name, tmp_path):
    """Random weights in the published shapes, at MinImagen's 256 tokens (past relative attention's
    max_distance 128, so every bucket is used); parity as export/bundle.py measures it."""
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=T5_VOCAB,
        relative_attention_num_buckets=32,
        dropout_rate=0.0,
        is_encoder_decoder=False,
        use_cache=False,
        **T5_SIZES[name],
    )
    model = T5EncoderModel(config)
    model.config._attn_implementation = "eager"
    stage = TextEncoderStage(TextEncoder(model, ByteTokenizer(256)))
    signature = text_encoder_signature(256, config.d_model, max_batch=4)
    export_stage(stage, signature, tmp_path / "text_encoder.onnx", vocab_size=T5_VOCAB)
    errors = measure_parity(stage, signature, tmp_path / "text_encoder.onnx", (1, 3), vocab_size=T5_VOCAB)
    print(f"{name}: FP32 relative error {max(errors):.2e} (tolerance {FP32_TOLERANCE:.0e})")
    assert max(errors) <= FP32_TOLERANCE
