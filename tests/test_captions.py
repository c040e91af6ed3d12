"""Prompt preprocessing as DeepFloyd IF's pipelines do it: `clean_caption` against diffusers' own on
captions generated here (HTML, URLs, e-mails, IPs, tags, CJK and other unicode, emoji, mojibake, sizes,
file names, punctuation, quotes, dashes, shop noise), the fallback without the `captions` extra, and
the runtime's T5 token ids at IF's setting (77, padded, truncated) against transformers' tokenizer on
the preprocessed captions."""

import random
import subprocess
import sys
import warnings

import numpy as np
import pytest

from imagen.runtime import captions
from imagen.runtime.captions import PREPROCESS_MODES, caption_cleaning_available, clean_caption, preprocess
from imagen.runtime.errors import BackendError, ParameterError, PromptError
from imagen.runtime.tokenizer import Tokenizer, validate_prompt

IF_MAX_LENGTH = 77  # IF's pipelines tokenize every prompt to 77 tokens
EXTRA_IDS = 100  # IF's T5 tokenizer (t5-v1_1-xxl) has transformers' default 100 extra ids

STYLES = ["a photo of", "An Oil Painting of", "a 3D render of", "WATERCOLOR of", "a sketch of", ""]
THINGS = "cat dog teapot castle robot lighthouse bicycle sunset river astronaut garden".split()
PLACES = "table beach forest city street moon desert kitchen ocean rooftop".split()


def mojibake(text: str) -> str:
    """UTF-8 read as Windows-1252 (Latin-1 where 1252 leaves a byte undefined), the damage ftfy repairs."""
    return "".join(bytes([b]).decode("cp1252", errors="ignore") or chr(b) for b in text.encode("utf-8"))


FRAGMENTS = {
    "html": [
        "<b>bold</b>",
        "<a href='https://x.com/p'>link</a>",
        "<p>para</p><br/>",
        "&amp;",
        "&quot;quoted&quot;",
        "&lt;tag&gt;",
        "&#39;s",
        "&nbsp;",
        "&amp;amp;",
        "&amp;quot;x",
        "&eacute;t&eacute;",
        '<div class="x">in</div>',
        "<script>alert(1)</script>",
        "<!-- note -->",
        "<person>",
        "a < b > c",
        "<img src=foo.png>",
        "</i>",
    ],
    "urls": [
        "http://example.com",
        "https://www.site.org/path/to?q=1&x=2",
        "www.shop.ru/item",
        "example.co",
        "sub.domain.net/page-1/",
        "ftp://files.edu",
        "http:",
        "https://",
        "www:example",
        "www://x",
        "news.gov",
        "bit.ly/abc",
        "foo.it",
        "mail.example.com@",
        "%20encoded%21",
        "a+b+c",
        "100%",
        "%E2%9C%93",
        "HTTP://UPPER.COM",
    ],
    "emails": ["john.doe@example.com", "info@shop.org", "user@mail.co.uk", "a@b", "x @ y"],
    "ips": ["192.168.0.1", "10.0.0.255", "1.2.3.4.5", "999.999.999.999", "127.0.0.1:8080", "1.2.3"],
    "tags": ["#sunset", "#123", "#12345678", "#1234", "@user_name", "@_x", "#ad #sale", "@日本", "#", "@"],
    "unicode": [
        "東京",
        "夜景",
        "ひらがな",
        "カタカナ",
        "한국어",
        "кошка",
        "Ελληνικά",
        "Café",
        "naïve",
        "Straße",
        "İstanbul",
        "ǅ",
        "ﬁ",
        "①",
        "ＡＢＣ",
        "½",
        "㈱",
        "㎏",
        "ㇰ",
        "䷀",
        "e\u0301",
        "soft\u00adhyphen",
        "zero\u200bwidth",
        "\u00a0nbsp\u3000",
    ],
    "emoji": ["🐱", "🌸🚀", "👩\u200d🚀", "❤️", "🇯🇵", "✨✨", "🎨🖌️"],
    "mojibake": [mojibake(t) for t in ["don’t", "“hello”", "Café", "naïve", "a — b", "🐱", "ÜBER", "it’s…"]],
    "sizes": ["1920x1080", "1920 x 1080", "4x4", "3.5x2.5", "10х20", "5×7", "100x", "1080p", "4k", "2x"],
    "files": [
        "img_1234.jpg",
        "photo.PNG",
        "IMG-20200101-WA0001.jpeg",
        "scan.pdf",
        "app.apk",
        "video.mp4",
        "file.webp",
        "logo.eps",
        "pic.bmp",
        "page.html",
        "readme.txt",
        "jpg image",
        "png images",
    ],
    "codes": ["jc6640", "jc6640vc", "6640vc231", "j2d1a2a", "ab123", "a1b2c3", "page 12", "1234567", "12345", "v2.0"],
    "punctuation": [
        "!!!",
        "???",
        "...",
        "…",
        "***sale***",
        "|",
        "/",
        "\\",
        "~",
        "§",
        "®",
        "©™",
        "•",
        "·",
        "¿¡",
        "{x}",
        "[x]",
        "(x)",
        " . ",
        ",",
        ";",
        " : ",
        "a,b",
        "a.b",
        "end.",
        "\\n",
        "\n",
        "\t",
        "  ",
        "&",
        "a-b-c-d-e",
        "snake_case_name_here",
        "---",
        "_",
        "3:45 @user",
        "at 3:45 <br>",
        ".hidden",
    ],
    "quotes": ["`x`", "´", "«x»", "“x”", "‘x’", "¨", '"x"', "'x'", "„x“", "‹x›", "「x」", "″", "′", "''", '""'],
    "dashes": list("-‐‑‒–—―⸗〜〰゠﹘﹣－֊־᐀᠆⸺⸻⹀︱︲"),
    "noise": [
        "free shipping",
        "Worldwide Free Shipping",
        "FREE DOWNLOAD",
        "download free",
        "click for details",
        "click on image",
        "click here",
        "page 3",
        "shipping",
    ],
}
WRAPS = [("", ""), ("  ", " \n"), ('"', '"'), ("'", "'"), ("-", "-"), ("_", ":"), (",", "+"), ("'", "")]


def plain(rng: random.Random) -> str:
    return f"{rng.choice(STYLES)} a {rng.choice(THINGS)} on the {rng.choice(PLACES)}".strip()


def noisy(rng: random.Random, kinds: list[str]) -> str:
    words = plain(rng).split()
    for _ in range(rng.randint(1, 4)):
        fragment = rng.choice(FRAGMENTS[rng.choice(kinds)])
        words.insert(rng.randint(0, len(words)), fragment)
    text = rng.choice(["", " ", "  "]).join(words) if rng.random() < 0.3 else " ".join(words)
    text = text.upper() if rng.random() < 0.15 else text.title() if rng.random() < 0.15 else text
    start, end = rng.choice(WRAPS)
    return start + text + end


def caption_corpus(per_kind: int = 25, seed: int = 0) -> list[str]:
    """Every fragment alone, then captions with fragments of one kind, of any kind, and long ones."""
    rng = random.Random(seed)
    kinds = list(FRAGMENTS)
    lines = [fragment for group in FRAGMENTS.values() for fragment in group]
    lines += [noisy(rng, [kind]) for kind in kinds for _ in range(per_kind)]
    lines += [noisy(rng, kinds) for _ in range(4 * per_kind)]
    lines += [" ".join(noisy(rng, kinds) for _ in range(rng.randint(4, 10))) for _ in range(2 * per_kind)]
    return lines + [plain(rng) for _ in range(per_kind)] + ["", " ", "A Plain Prompt"]


@pytest.fixture(scope="module")
def diffusers_if():
    """diffusers' IF pipeline without its models: `_text_preprocessing` and `_clean_caption` need none."""
    pytest.importorskip("bs4", reason="the captions extra (beautifulsoup4) is not installed")
    pytest.importorskip("ftfy", reason="the captions extra (ftfy) is not installed")
    module = pytest.importorskip("diffusers.pipelines.deepfloyd_if.pipeline_if")
    return object.__new__(module.IFPipeline)


# diffusers' own BeautifulSoup calls warn about captions that look like URLs or file names
QUIET_DIFFUSERS = pytest.mark.filterwarnings("ignore:The input passed in on this line looks more like")


@QUIET_DIFFUSERS
def test_clean_caption_equals_diffusers_on_generated_captions(diffusers_if, monkeypatch):
    lines = caption_corpus()
    fired = set()

    def recording(rules, text):
        for pattern, replacement in rules:
            cleaned = pattern.sub(replacement, text)
            if cleaned != text:
                fired.add(pattern.pattern)
            text = cleaned
        return text

    monkeypatch.setattr(captions, "_apply", recording)
    once = [(line, clean_caption(line), diffusers_if._clean_caption(line)) for line in lines]
    wrong = [(line, ours, theirs) for line, ours, theirs in once if ours != theirs]
    assert not wrong, f"{len(wrong)} of {len(lines)} captions differ from diffusers', e.g. {wrong[:3]!r}"
    twice = preprocess(lines, "clean_caption")
    assert twice == diffusers_if._text_preprocessing(lines, clean_caption=True)
    assert twice == [clean_caption(ours) for _, ours, _ in once]
    # the corpus reaches every rule, and cleaning changes most captions beyond lower/strip
    rules = captions._BEFORE_HTML + captions._AFTER_HTML + captions._AFTER_FTFY
    missed = [pattern.pattern for pattern, _ in rules if pattern.pattern not in fired]
    assert not missed, f"no caption exercises {missed}"
    changed = sum(a != b for a, b in zip(twice, preprocess(lines, "lower_strip")))
    second = sum(clean_caption(ours) != ours for _, ours, _ in once)
    print(f"{len(lines)} captions equal to diffusers'; cleaning changed {changed}, the second pass {second}")
    assert changed > len(lines) // 2 and second > 0


@QUIET_DIFFUSERS
def test_lower_strip_equals_diffusers_without_cleaning(diffusers_if):
    lines = caption_corpus(per_kind=5, seed=1)
    assert preprocess(lines, "lower_strip") == diffusers_if._text_preprocessing(lines, clean_caption=False)


def test_none_returns_the_prompts_unchanged():
    prompts = ["  A Red CIRCLE  ", "<b>x</b> http://a.com", ""]
    assert preprocess(prompts, "none") == prompts
    assert preprocess("One Prompt ", "none") == ["One Prompt "]
    assert preprocess(["  A Red CIRCLE  "], "lower_strip") == ["a red circle"]


@pytest.mark.parametrize("mode", ["clean", "", None, "Lower_Strip"])
def test_unknown_mode_is_a_parameter_error(mode):
    with pytest.raises(ParameterError, match="one of none, lower_strip, clean_caption"):
        preprocess(["a cat"], mode)
    assert PREPROCESS_MODES == ("none", "lower_strip", "clean_caption")


@pytest.mark.parametrize("mode", PREPROCESS_MODES)
def test_a_prompt_that_is_not_text_is_a_prompt_error(mode):
    with pytest.raises(PromptError, match="prompt 1 must be a str, got bytes"):
        preprocess(["a cat", b"a dog"], mode)


@pytest.mark.parametrize("missing", ["bs4", "ftfy"])
def test_without_the_extra_falls_back_to_lower_strip_and_warns_once(monkeypatch, missing):
    monkeypatch.setitem(sys.modules, missing, None)  # import fails as if not installed
    monkeypatch.setattr(captions, "_fallback_warned", False)
    assert caption_cleaning_available() is False
    prompts = ["  Visit <b>HTTP://SHOP.COM</b> Now!!  ", "A Cat"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = [preprocess(prompts, "clean_caption") for _ in range(3)]
        preprocess(["x"], "clean_caption")
    assert results == [["visit <b>http://shop.com</b> now!!", "a cat"]] * 3
    assert all(isinstance(p, str) for p in results[0])
    assert len(caught) == 1, [str(w.message) for w in caught]
    message = str(caught[0].message)
    assert "differ from diffusers'" in message and "pip install 'imagen-cascade[captions]'" in message
    with pytest.raises(BackendError, match=r"imagen-cascade\[captions\]"):
        clean_caption("a cat")


def test_cleaning_is_available_and_quiet_with_the_extra():
    bs4 = pytest.importorskip("bs4")
    pytest.importorskip("ftfy")
    assert caption_cleaning_available() is True
    prompts = ["http:", "page.html", "  A CAT  "]  # BeautifulSoup sees a URL, then a file name
    with warnings.catch_warnings(record=True) as caught:  # the filters as they are, none in front
        cleaned = preprocess(prompts, "clean_caption")
        # BeautifulSoup does warn about such text, when called from elsewhere
        bs4.BeautifulSoup("page.html", features="html.parser")
    assert cleaned == ["http", "page. html", "a cat"]
    assert [w.filename for w in caught] == [__file__], [str(w.message) for w in caught]


def test_importing_captions_loads_neither_the_extra_nor_torch():
    code = (
        "import sys, imagen.runtime.captions; "
        "print(sorted({'bs4', 'ftfy', 'torch', 'transformers', 'diffusers'} & set(sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout.strip()) == (0, "[]"), done.stderr[-2000:]


@pytest.fixture(scope="module")
def t5_tokenizer_folder(tmp_path_factory):
    """A T5 tokenizer folder as IF's `tokenizer/` holds it, with a vocabulary trained here on captions."""
    spm = pytest.importorskip("sentencepiece")
    root = tmp_path_factory.mktemp("if_tokenizer")
    rng = random.Random(5)
    text = [noisy(rng, list(FRAGMENTS)) for _ in range(2000)] + [" ".join(map(chr, range(33, 127)))]
    (root / "text.txt").write_text("\n".join(t.replace("\n", " ") for t in text), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(root / "text.txt"),
        model_prefix=str(root / "spiece"),
        vocab_size=400,
        hard_vocab_limit=False,
        model_type="unigram",
        character_coverage=0.9995,  # the rarest characters stay unknown
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        minloglevel=2,
    )
    folder = root / "tokenizer"
    folder.mkdir()
    (root / "spiece.model").rename(folder / "spiece.model")
    return folder


@pytest.mark.parametrize("mode", ["clean_caption", "lower_strip"])
def test_token_ids_at_if_settings_equal_transformers(t5_tokenizer_folder, mode):
    if mode == "clean_caption" and not caption_cleaning_available():
        pytest.skip("the captions extra (beautifulsoup4, ftfy) is not installed")
    transformers = pytest.importorskip("transformers")
    theirs = transformers.T5Tokenizer.from_pretrained(t5_tokenizer_folder, extra_ids=EXTRA_IDS)
    ours = Tokenizer("sentencepiece", IF_MAX_LENGTH, model_file=t5_tokenizer_folder / "spiece.model", extra_ids=100)
    prompts = preprocess(caption_corpus(per_kind=20, seed=3) + ["", "<extra_id_0> </s> <pad>"], mode)
    # the runtime refuses control characters that IF's pipeline would pass on; nothing else is left out
    refused = [p for p in prompts if not _accepted(p)]
    assert all(any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in p if c not in "\t\n") for p in refused)
    prompts = [p for p in prompts if _accepted(p)]
    # as IF's `encode_prompt` calls it (return_tensors aside)
    expected = theirs(prompts, padding="max_length", max_length=IF_MAX_LENGTH, truncation=True, add_special_tokens=True)
    input_ids, attention_mask, truncated = ours(prompts, allow_empty=True)
    wrong = [p for p, a, b in zip(prompts, input_ids.tolist(), expected["input_ids"]) if a != b]
    assert not wrong, f"{len(wrong)} of {len(prompts)} prompts differ from transformers', e.g. {wrong[:3]!r}"
    np.testing.assert_array_equal(attention_mask, np.array(expected["attention_mask"]))
    whole = theirs(prompts, add_special_tokens=True)["input_ids"]
    assert truncated == [len(ids) > IF_MAX_LENGTH for ids in whole]
    empty = sum(not p.strip() for p in prompts)
    print(f"{mode}: {len(prompts)} prompts equal, {sum(truncated)} truncated, {empty} empty, {len(refused)} refused")
    assert sum(truncated) >= 20 and empty >= 2 and len(prompts) >= 300
    unk = int((input_ids == 2).sum())
    assert unk > 0, "the corpus should hold characters outside the vocabulary"


def _accepted(prompt: str) -> bool:
    try:
        validate_prompt(prompt, allow_empty=True)
    except PromptError:
        return False
    return True
