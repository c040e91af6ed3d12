"""Fuzzing the manifest loader: any manifest.json, however broken, either loads or raises one of
the runtime's typed errors (ImagenError subclasses); never another exception.

The budget is bounded (max_examples, no deadline) so that it runs in CI in well under a
minute. Each example mutates a valid manifest (from the exported fp32 bundle): random JSON
values at random keys, deleted keys, wrong types, huge or non-finite numbers, paths with
`..`, absolute paths or NUL bytes, non-object roots, or random bytes as the whole file.
"""

import json
import math
import shutil

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from imagen.runtime import BundleError, ImagenError, load_bundle
from imagen.runtime.tokenizer import Tokenizer

FUZZ = settings(
    max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)

NASTY_STRINGS = st.sampled_from(
    [
        "",
        "..",
        "../manifest.json",
        "a/../../x.onnx",
        "/etc/passwd",
        "C:\\x.onnx",
        "\\\\server\\x",
        "x\x00y",
        "unet_0.onnx",
        "text_encoder.onnx",
        "tokenizer",
        ".",
        "batch",
        "float32",
        "int64",
        "bool",
        "ü" * 300,
        "byte",
        "sentencepiece",
        "imagen-bundle",
        "a" * 5000,
    ]
)
NUMBERS = st.one_of(
    st.integers(min_value=-(10**30), max_value=10**30),
    st.sampled_from([0, 1, -1, 2**63, 10**400]),
    st.floats(allow_nan=True, allow_infinity=True),
)
LEAVES = st.one_of(st.none(), st.booleans(), NUMBERS, st.text(max_size=12), NASTY_STRINGS)
VALUES = st.recursive(
    LEAVES,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def fuzz_bundle(bundle_fp32, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz") / "bundle"
    shutil.copytree(bundle_fp32, root)
    original = json.loads((root / "manifest.json").read_text())
    return root, original


def _paths(node, prefix=()):
    """Every (key path) in a JSON tree, containers included."""
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, prefix + (key,))
    elif isinstance(node, list):
        for index, value in enumerate(node[:8]):  # long lists (betas) need no more than a few indices
            yield from _paths(value, prefix + (index,))


def _mutate(manifest, data):
    paths = [p for p in _paths(manifest) if p]
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        path = data.draw(st.sampled_from(paths), label="path")
        parent = manifest
        try:
            for key in path[:-1]:
                parent = parent[key]
            parent[path[-1]]  # noqa: B018 - the path may have gone with an earlier mutation
        except (KeyError, IndexError, TypeError):
            continue
        if not isinstance(parent, (dict, list)):  # an earlier mutation turned a container into a string
            continue
        action = data.draw(st.sampled_from(["replace", "delete", "wrap", "nasty", "number"]), label="action")
        key = path[-1]
        if action == "delete":
            del parent[key]
        elif action == "wrap":
            parent[key] = data.draw(st.sampled_from([[parent[key]], {"x": parent[key]}, str(parent[key])[:50]]))
        elif action == "nasty":
            parent[key] = data.draw(NASTY_STRINGS)
        elif action == "number":
            parent[key] = data.draw(NUMBERS)
        else:
            parent[key] = data.draw(VALUES, label="value")
    return manifest


def _load(root):
    """The loader as Pipeline.load runs it before any session: manifest, then tokenizer."""
    try:
        Tokenizer.from_bundle(load_bundle(root))
    except ImagenError:
        return False
    return True


def _write(root, text: str):
    (root / "manifest.json").write_text(text, encoding="utf-8", errors="surrogatepass")


@FUZZ
@given(data=st.data())
def test_mutated_manifest_loads_or_raises_typed_errors(fuzz_bundle, data):
    root, original = fuzz_bundle
    manifest = _mutate(json.loads(json.dumps(original)), data)
    try:
        text = json.dumps(manifest)
    except (ValueError, OverflowError):
        return
    _write(root, text)
    _load(root)


@FUZZ
@given(root_value=VALUES)
@example(root_value=[])
@example(root_value=None)
@example(root_value="imagen-bundle")
@example(root_value=math.nan)
def test_any_json_document_loads_or_raises_typed_errors(fuzz_bundle, root_value):
    root, _ = fuzz_bundle
    _write(root, json.dumps(root_value))
    assert _load(root) is False


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(lambda s: s.encode("utf-8", "surrogatepass"))))
@example(raw=b"\xff\xfe{}")
@example(raw=b"\x80\x04K\x01.")  # a pickle
@example(raw=b'{"format": "imagen-bundle", "format_version": 1e999}')
@example(raw=b"[" * 100_000)  # nesting deep enough to exhaust the JSON parser's recursion
def test_random_bytes_as_manifest_raise_typed_errors(fuzz_bundle, raw):
    root, _ = fuzz_bundle
    (root / "manifest.json").write_bytes(raw)
    assert _load(root) is False


def test_the_unmutated_manifest_still_loads(fuzz_bundle):
    root, original = fuzz_bundle
    _write(root, json.dumps(original))
    assert _load(root) is True


# What the fuzzer found, kept as plain cases: each raised an untyped exception before the fix.

FOUND = {
    "tokenizer pad_id empty string": (("tokenizer", "pad_id"), "", r"tokenizer\.pad_id"),
    "tokenizer eos_id a list": (("tokenizer", "eos_id"), [0], r"tokenizer\.eos_id"),
    "tokenizer offset too large": (("tokenizer", "offset"), 2**40, r"tokenizer\.offset"),
    "beta a huge integer": (("schedules", "unet_0", "betas", 0), 10**400, r"schedules\.unet_0"),
    "beta an object": (("schedules", "unet_0", "betas", 0), {"x": 0.1}, r"schedules\.unet_0"),
    "beta a list": (("schedules", "unet_1", "betas", 3), [0.1], r"schedules\.unet_1"),
    "beta a string": (("schedules", "lowres", "betas", 0), "0.1", r"schedules\.lowres"),
    "default a huge integer": (("defaults", "guidance_scale"), 10**400, r"defaults\.guidance_scale"),
    "file name too long": (("stages", "unet_0", "file"), "\u00fc" * 300, r"cannot read stage unet_0"),
    "file name with NUL": (("stages", "unet_1", "file"), "unet_1\x00.onnx", r"NUL character"),
    # Checked at load rather than at the first request:
    "default sampler unknown": (("defaults", "sampler"), "euler", r"defaults\.sampler"),
    "default steps above the timesteps": (("defaults", "steps"), 10**6, r"defaults\.steps"),
    "default steps a string": (("defaults", "steps"), "25", r"defaults\.steps"),
    "default sr_strength zero": (("defaults", "sr_strength"), 0, r"defaults\.sr_strength"),
    "default sr_strength above one": (("defaults", "sr_strength"), 1.5, r"defaults\.sr_strength"),
    "default sr_strength a bool": (("defaults", "sr_strength"), True, r"defaults\.sr_strength"),
}


@pytest.mark.parametrize("case", sorted(FOUND))
def test_found_by_fuzzing(case, fuzz_bundle):
    root, original = fuzz_bundle
    path, value, pattern = FOUND[case]
    manifest = json.loads(json.dumps(original))
    node = manifest
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    _write(root, json.dumps(manifest))
    with pytest.raises(BundleError, match=pattern):
        load_bundle(root)
    _write(root, json.dumps(original))


def test_deeply_nested_json_is_a_bundle_error(fuzz_bundle):
    root, original = fuzz_bundle
    (root / "manifest.json").write_bytes(b"[" * 100_000)
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(root)
    _write(root, json.dumps(original))
