"""The documents made from the bundle contract: docs/manifest.schema.json and docs/bundle.md's tables
are what tools/contract_docs.py makes from the contract's dataclasses today; the schema accepts every
key `Manifest.to_json` can write (the demo bundle's manifest, and one with every optional record set)
and refuses what the manifest's readers refuse; bundle.md's example agrees with the signatures."""

import dataclasses
import importlib.util
import json
import re
from pathlib import Path

import pytest

from imagen.runtime.contract import (
    FileEntry,
    Manifest,
    Source,
    StageSignature,
    TensorRTEntry,
    text_encoder_signature,
    unet_signature,
)
from imagen.runtime.contract.schema import CONSTRAINTS, LAYOUT, RECORDS, manifest_schema

jsonschema = pytest.importorskip("jsonschema", reason="pip install -e '.[dev]'")

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "runtime" / "demo" / "manifest.json"
SHA = "0" * 64


def load_tool():
    spec = importlib.util.spec_from_file_location("contract_docs", ROOT / "tools" / "contract_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def validator():
    return jsonschema.Draft202012Validator(json.loads((ROOT / "docs" / "manifest.schema.json").read_text()))


def full_manifest() -> dict:
    """The demo's manifest with every optional record and key set, as export would write them."""
    manifest = Manifest.from_json(json.loads(DEMO.read_text()))
    engine = FileEntry("tensorrt/sm90-10.3.0/unet_0.plan", 10, SHA)
    tensorrt = TensorRTEntry("tensorrt/sm90-10.3.0", "9.0", "10.3.0", {"unet_0": engine}, "NVIDIA H100", True)
    tensorrt = dataclasses.replace(tensorrt, max_rel_error={"unet_0": 1e-3}, tolerance=1e-2)
    stage = manifest.stages["unet_1"]
    stage = dataclasses.replace(stage, external_data=(FileEntry("unet_1.onnx.data", 5, SHA),))
    tokenizer = dataclasses.replace(manifest.tokenizer, extra_ids=100)
    return dataclasses.replace(
        manifest,
        tensorrt=tensorrt,
        stages={**manifest.stages, "unet_1": stage},
        tokenizer=tokenizer,
        defaults=dataclasses.replace(manifest.defaults, steps={"unet_0": 10, "unet_1": None}, sr_strength=0.5),
        source=Source("demo", SHA, "/runs/demo", "ema"),
    ).to_json()


def test_committed_documents_are_generated_from_the_contract():
    tool = load_tool()
    assert (ROOT / "docs" / "manifest.schema.json").read_text() == tool.schema_text(), (
        "docs/manifest.schema.json differs from the contract: run python tools/contract_docs.py"
    )
    text = (ROOT / "docs" / "bundle.md").read_text()
    assert text == tool.with_tables(text), "docs/bundle.md's tables differ: run python tools/contract_docs.py"
    assert tool.main(["--check"]) == 0


def test_the_schema_is_valid_and_the_demo_manifest_follows_it():
    jsonschema.Draft202012Validator.check_schema(manifest_schema())
    validator().validate(json.loads(DEMO.read_text()))


def test_every_key_export_can_write_is_in_the_schema():
    manifest = full_manifest()
    assert {"tensorrt", "source", "producer"} <= set(manifest)
    assert {"gpu_name", "version_compatible", "max_rel_error", "tolerance"} <= set(manifest["tensorrt"])
    assert "external_data" in manifest["stages"]["unet_1"] and manifest["tokenizer"]["extra_ids"] == 100
    validator().validate(manifest)
    assert Manifest.from_json(manifest).to_json() == manifest


@pytest.mark.parametrize(
    "where,value",
    [
        (("format",), "other-bundle"),
        (("stages", "unet_0", "sha256"), "abc"),
        (("stages", "unet_0", "batch"), {"min": 1, "max": 8}),
        (("stages", "unet_0", "inputs", 0, "shape"), ["rows", 3]),
        (("defaults", "sampler"), "euler"),
        (("defaults", "sr_strength"), 0),
        (("schedules", "unet_1", "betas"), [0.5, 1.5]),
        (("tokenizer", "kind"), "wordpiece"),
        (("tensorrt", "engines", "unet_0", "file"), "/abs/unet_0.plan"),
        (("stages", "unet_0", "surprise"), 1),
        (("source", "surprise"), "x"),
    ],
)
def test_the_schema_refuses_what_the_readers_refuse(where, value):
    manifest = full_manifest()
    target = manifest
    for key in where[:-1]:
        target = target[key]
    target[where[-1]] = value
    errors = list(validator().iter_errors(manifest))
    assert errors, f"{'.'.join(map(str, where))} = {value!r} was accepted"


def test_layout_and_constraints_name_real_fields():
    """A renamed field cannot leave a rule behind that no longer applies."""
    for cls, name in [*LAYOUT, *CONSTRAINTS]:
        assert cls in RECORDS or cls is StageSignature, cls
        assert name in {f.name for f in dataclasses.fields(cls)}, f"{cls.__name__}.{name} is not a field"


def test_the_example_in_bundle_md_has_the_signatures_batch_ranges():
    text = (ROOT / "docs" / "bundle.md").read_text()
    example = json.loads(re.search(r"## manifest.json\n\n```json\n(.*?)\n```", text, re.S).group(1))
    sizes, text_info = example["image_sizes"], example["text"]
    stage = example["stages"]["text_encoder"]
    max_batch = stage["batch"]["max"]
    signature = text_encoder_signature(text_info["max_length"], text_info["embed_dim"], max_batch).to_json()
    assert {k: stage[k] for k in ("inputs", "outputs", "batch")} == signature
    unet = unet_signature(0, sizes[0], text_info["max_length"], text_info["embed_dim"], False, max_batch)
    batch = unet.to_json()["batch"]
    assert f"batch min {batch['min']}, opt {batch['opt']}, max {batch['max']}" in example["stages"]["unet_0"]["..."]
