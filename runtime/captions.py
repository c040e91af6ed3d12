"""Prompt preprocessing before tokenization, as DeepFloyd IF's diffusers pipelines do it.

A bundle names one mode, so a prompt is always prepared the same way for its text encoder:
- `none`: the prompt as given;
- `lower_strip`: `prompt.lower().strip()`;
- `clean_caption`: `clean_caption` applied twice (it lower-cases and strips itself), the way IF's
  pipelines clean every prompt and negative prompt by default.

`clean_caption` removes what web-scraped captions carry besides a description (URLs, HTML, @names,
CJK ideographs, ids, file names, sizes, shop noise) and normalizes quotes, dashes and spaces. Its
output equals diffusers' `IFPipeline._clean_caption` byte for byte: the same rules in the same
order, since a rule often only sees text that an earlier one left. It needs BeautifulSoup
(`beautifulsoup4`) and `ftfy`, the optional extra `captions`, imported only when a caption is
cleaned; without them `preprocess` falls back to `lower_strip` and says so once per process, as
diffusers falls back silently.
"""

import html
import re
import warnings
from urllib.parse import unquote_plus

from .contract.signatures import PREPROCESS_MODES
from .errors import BackendError, ParameterError, PromptError

INSTALL = "pip install 'imagen-cascade[captions]'"

_DOMAINS = "com|co|ru|net|org|edu|gov|it"
_FILE_TYPES = "png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4"
# hyphen-minus and the other Unicode dashes that become "-"
_DASHES = "\u002d\u058a\u05be\u1400\u1806\u2010-\u2015\u2e17\u2e1a\u2e3a\u2e3b\u2e40\u301c\u3030\u30a0"
_DASHES += "\ufe31\ufe32\ufe58\ufe63\uff0d"
# punctuation and symbols that separate words in shop titles (***SALE***, #SALE, a|b, a/b)
_SEPARATORS = r"#®•©™&@·º½¾¿¡§~)(\][}{|\\/*"


def _rules(*pairs: tuple[str, str]) -> tuple[tuple[re.Pattern, str], ...]:
    return tuple((re.compile(pattern), replacement) for pattern, replacement in pairs)


def _url(scheme: str) -> str:
    # a scheme with its slashes, or a host under one of a few top-level domains with its path; the
    # scheme alternative stops after "//", the host alternative takes what follows
    return rf"\b(?:{scheme}:(?:/{{1,3}}|[a-zA-Z0-9%])|[a-zA-Z0-9.-]+\.(?:{_DOMAINS})[\w/-]*\b/?(?!@))"


# Before the HTML is parsed: tags must still be whole.
_BEFORE_HTML = _rules(
    ("<person>", "person"),
    (_url("https?"), ""),
    (_url("www"), ""),  # "www:" as IF writes it ("www." hosts go by the host rule), and the hosts again
)

# Between the HTML parser and ftfy.
_AFTER_HTML = _rules(
    (r"@\w+\b", ""),  # @names
    ("[\u31c0-\u9fff]+", ""),  # CJK strokes, kana extensions, enclosed letters, compatibility, ideographs
    (f"[{_DASHES}]+", "-"),
    ("[`´«»“”¨]", '"'),
    ("[‘’]", "'"),
    ("&quot;?", ""),
    ("&amp", ""),
    (r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}", " "),  # IPv4 addresses
    (r"\d:\d\d\s+$", ""),  # a trailing time or article id
    (r"\\n", " "),  # an escaped newline left in the text
    (r"#\d{1,3}\b", ""),
    (r"#\d{5,}\b", ""),
    (r"\b\d{6,}\b", ""),  # long numbers: ids, phone numbers
    (rf"\S+\.(?:{_FILE_TYPES})", ""),  # file names
    ("[\"']{2,}", '"'),
    (r"\.{2,}", " "),
    (f"[{_SEPARATORS}]+", " "),
    (r"\s+\.\s+", " "),
)

# A caption with more than three of these is a slug (this-is-my-cat, this_is_my_cat): they become spaces.
_WORD_JOINERS = re.compile("[-_]")

# After ftfy and HTML entities are resolved.
_AFTER_FTFY = _rules(
    (r"\b[a-zA-Z]{1,3}\d{3,15}\b", ""),  # product codes: jc6640
    (r"\b[a-zA-Z]+\d+[a-zA-Z]+\b", ""),  # jc6640vc
    (r"\b\d+[a-zA-Z]+\d+\b", ""),  # 6640vc231
    (r"(worldwide\s+)?(free\s+)?shipping", ""),
    (r"(free\s)?download(\sfree)?", ""),
    (r"\bclick\b\s(?:for|on)\s\w+", ""),
    (rf"\b(?:{_FILE_TYPES})(\simages?)?", ""),
    (r"\bpage\s+\d+\b", ""),
    (r"\b\d*[a-zA-Z]+\d+[a-zA-Z]+\d+[a-zA-Z\d]*\b", " "),  # j2d1a2a
    (r"\b\d+\.?\d*[xх×]\d+\.?\d*\b", ""),  # sizes: 1920x1080 (latin x, cyrillic х, times sign)
    (r"\b\s+:\s+", ": "),
    (r"(\D[,./])\b", r"\1 "),  # a space after a comma, full stop or slash that touches the next word
    (r"\s+", " "),
    # not stripped here: a leading or trailing space keeps the next rules from matching
    ("^[\"']([\\w\\W]+)[\"']$", r"\1"),  # one pair of enclosing quotes
    ("^['_,\\-:;]", ""),
    ("['_,\\-:+]$", ""),
    (r"^\.\S+$", ""),  # a lone ".word"
)

_fallback_warned = False
_THIS_MODULE = re.escape(__name__)


def _cleaning_modules():
    """(BeautifulSoup, ftfy), or None when either is not installed."""
    try:
        import ftfy
        from bs4 import BeautifulSoup, MarkupResemblesLocatorWarning
    except ImportError:
        return None
    # BeautifulSoup warns when a caption looks like a URL or a file name; here it is text. The filter
    # holds only for calls from this module, not for the host's own use of bs4; looked for each time,
    # since a host's catch_warnings may have restored the filters since the last call.
    ignore = ("ignore", None, MarkupResemblesLocatorWarning, re.compile(_THIS_MODULE), 0)
    if ignore not in warnings.filters:
        warnings.filterwarnings("ignore", category=MarkupResemblesLocatorWarning, module=_THIS_MODULE)
    return BeautifulSoup, ftfy


def caption_cleaning_available() -> bool:
    """Whether `clean_caption` can run here (beautifulsoup4 and ftfy installed)."""
    return _cleaning_modules() is not None


def _apply(rules, text: str) -> str:
    for pattern, replacement in rules:
        text = pattern.sub(replacement, text)
    return text


def clean_caption(text: str) -> str:
    """One pass of DeepFloyd IF's caption cleaning (IF's pipelines run it twice: `preprocess`)."""
    modules = _cleaning_modules()
    if modules is None:
        raise BackendError(f"cleaning captions needs beautifulsoup4 and ftfy; install them with {INSTALL}")
    beautiful_soup, ftfy = modules
    text = unquote_plus(str(text)).strip().lower()
    text = _apply(_BEFORE_HTML, text)
    text = beautiful_soup(text, features="html.parser").text
    text = _apply(_AFTER_HTML, text)
    if len(_WORD_JOINERS.findall(text)) > 3:
        text = _WORD_JOINERS.sub(" ", text)
    text = html.unescape(html.unescape(ftfy.fix_text(text)))  # twice: doubly escaped entities (&amp;amp;)
    return _apply(_AFTER_FTFY, text).strip()


def _warn_fallback_once() -> None:
    global _fallback_warned
    if _fallback_warned:
        return
    _fallback_warned = True
    warnings.warn(
        "this bundle cleans prompts as DeepFloyd IF does (clean_caption), which needs beautifulsoup4 and ftfy; "
        "they are not installed, so prompts are only lower-cased and stripped and images will differ from "
        f"diffusers' for prompts that cleaning would change; install them with {INSTALL}",
        stacklevel=3,
    )


def preprocess(prompts: list[str], mode: str) -> list[str]:
    """The prompts prepared for the tokenizer as `mode` (one of PREPROCESS_MODES) says."""
    if mode not in PREPROCESS_MODES:
        raise ParameterError("text preprocessing mode", f"one of {', '.join(PREPROCESS_MODES)}", mode)
    if isinstance(prompts, str):
        prompts = [prompts]
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise PromptError(f"prompt {index} must be a str, got {type(prompt).__name__}")
    if mode == "clean_caption" and not caption_cleaning_available():
        _warn_fallback_once()
        mode = "lower_strip"
    if mode == "none":
        return list(prompts)
    if mode == "lower_strip":
        return [prompt.lower().strip() for prompt in prompts]
    return [clean_caption(clean_caption(prompt)) for prompt in prompts]
