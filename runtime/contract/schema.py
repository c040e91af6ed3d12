"""The manifest's JSON schema (docs/manifest.schema.json), made from the contract's dataclasses: one
object per record, one property per field, its JSON type from the field's annotation, required
when the field has no default. What the annotations cannot say is declared here, each entry naming
its record and field: where a record's fields sit in JSON other than one key per field
(`LAYOUT`), and the ranges and patterns the readers check (`CONSTRAINTS`, from the contract's
constants). `manifest_schema()` is the whole schema; tests hold it to the committed file and to
what `Manifest.to_json` writes.
"""

import dataclasses
import types
import typing

from .entries import FileEntry, Parity, ScheduleEntry, Source, TensorRTEntry
from .manifest import Defaults, Manifest, StageEntry, TokenizerEntry
from .sampling import CHOICES, SamplingEntry
from .settings import SAMPLER_NAMES
from .signatures import (
    BATCH,
    FORMAT,
    FORMAT_VERSION,
    LOWRES,
    MAX_TOKEN_ID,
    PREPROCESS_MODES,
    SUPPORTED_VERSIONS,
    TEXT_ENCODER,
    TOKENIZER_KINDS,
    StageSignature,
    TensorSpec,
    unet_name,
)

RECORDS = (Manifest, Defaults, TokenizerEntry, ScheduleEntry, StageEntry, TensorSpec, FileEntry, Parity)
RECORDS += (TensorRTEntry, Source, SamplingEntry)
HEADER = {"format": {"const": FORMAT}, "format_version": {"enum": list(SUPPORTED_VERSIONS)}}
UNET = f"{unet_name(0)[:-1]}[0-9]+"  # unet_0, unet_1, ...
PRECISIONS = ("fp32", "fp16")
DTYPES = ("float32", "float16", "int64", "int32", "bool")

# Where JSON is not one key per field: "flatten" puts the record's keys in the enclosing object, "omit"
# leaves out what the enclosing key already says (a stage's name), ("group", key) nests under `key`.
LAYOUT = {
    (Manifest, "format_version"): "omit",  # in HEADER
    (Manifest, "max_length"): ("group", "text"),
    (Manifest, "embed_dim"): ("group", "text"),
    (StageEntry, "name"): "omit",
    (StageEntry, "file"): "flatten",
    (StageEntry, "signature"): "flatten",
    (StageSignature, "name"): "omit",
    (StageSignature, "batch_min"): ("group", "batch", "min"),
    (StageSignature, "batch_opt"): ("group", "batch", "opt"),
    (StageSignature, "batch_max"): ("group", "batch", "max"),
}

POSITIVE, NON_NEGATIVE = {"minimum": 1}, {"minimum": 0}
TOKEN_ID = {"minimum": 0, "exclusiveMaximum": MAX_TOKEN_ID}
SHARE = {"exclusiveMinimum": 0, "maximum": 1}  # (0, 1]
CONSTRAINTS = {
    (Manifest, "channels"): POSITIVE,
    (Manifest, "image_sizes"): {"minItems": 1, "items": POSITIVE},
    (Manifest, "max_length"): POSITIVE,
    (Manifest, "embed_dim"): POSITIVE,
    (Manifest, "schedules"): {"propertyNames": {"pattern": f"^({UNET}|{LOWRES})$"}},
    (Manifest, "stages"): {
        "required": [TEXT_ENCODER, unet_name(0)],
        "propertyNames": {"pattern": f"^({TEXT_ENCODER}|{UNET})$"},
    },
    (Manifest, "producer"): {"additionalProperties": {"type": ["string", "null"]}},
    (TokenizerEntry, "kind"): {"enum": list(TOKENIZER_KINDS)},
    (TokenizerEntry, "pad_id"): TOKEN_ID,
    (TokenizerEntry, "eos_id"): TOKEN_ID,
    (TokenizerEntry, "offset"): TOKEN_ID,
    (TokenizerEntry, "extra_ids"): TOKEN_ID,
    (TokenizerEntry, "max_length"): POSITIVE,
    (TokenizerEntry, "preprocess"): {"enum": list(PREPROCESS_MODES)},
    (Defaults, "guidance_scale"): {  # one number for every Unet, or {"unet_i": number} naming each
        **NON_NEGATIVE,
        "propertyNames": {"pattern": f"^{UNET}$"},
        "additionalProperties": {"type": "number", **NON_NEGATIVE},
    },
    (Defaults, "dynamic_thresholding_percentile"): SHARE,
    (Defaults, "lowres_sample_noise_level"): {"minimum": 0, "maximum": 1},
    (Defaults, "sampler"): {"enum": list(SAMPLER_NAMES)},
    (Defaults, "steps"): {  # null: every timestep; n for every Unet; {"unet_i": n or null}
        **POSITIVE,
        "propertyNames": {"pattern": f"^{UNET}$"},
        "additionalProperties": {"type": ["integer", "null"], **POSITIVE},
    },
    (Defaults, "sr_strength"): SHARE,
    (ScheduleEntry, "betas"): {
        "minItems": 1,
        "items": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
    },
    (ScheduleEntry, "timesteps"): POSITIVE,
    (ScheduleEntry, "alphas_cumprod"): {
        "minItems": 1,
        "items": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
    },
    **{(SamplingEntry, key): {"enum": list(choices)} for key, choices in CHOICES.items()},
    (SamplingEntry, "steps_offset"): {"minimum": 0, "exclusiveMaximum": 1000},
    (SamplingEntry, "threshold_percentile"): SHARE,
    (SamplingEntry, "threshold_max"): {"minimum": 1},
    (StageEntry, "precision"): {"enum": list(PRECISIONS)},
    (StageEntry, "flops"): NON_NEGATIVE,
    (StageEntry, "image_size"): POSITIVE,
    (StageSignature, "inputs"): {"minItems": 1},
    (StageSignature, "outputs"): {"minItems": 1},
    (StageSignature, "batch_min"): POSITIVE,
    (StageSignature, "batch_opt"): POSITIVE,
    (StageSignature, "batch_max"): POSITIVE,
    (TensorSpec, "dtype"): {"enum": list(DTYPES)},
    (TensorSpec, "shape"): {"items": {"anyOf": [{"type": "integer", **POSITIVE}, {"const": BATCH}]}},
    (FileEntry, "file"): {"pattern": r"^[^/\\]"},  # relative; the loader also refuses `..` and symlinks out
    (FileEntry, "bytes"): NON_NEGATIVE,
    (FileEntry, "sha256"): {"pattern": "^[0-9a-f]{64}$"},
    (Parity, "batch_sizes"): {"items": {"type": "integer", **POSITIVE}},
    (Parity, "rel_error"): {"items": {"type": "number", **NON_NEGATIVE}},
    (Parity, "tolerance"): {"exclusiveMinimum": 0},
    (TensorRTEntry, "max_rel_error"): {"additionalProperties": NON_NEGATIVE},
    (TensorRTEntry, "tolerance"): {"exclusiveMinimum": 0},
}

# The keywords of each JSON type, so that a field of several types gets each constraint where it applies.
KEYWORDS = {
    "integer": {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "enum"},
    "number": {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "enum"},
    "string": {"pattern", "enum"},
    "array": {"items", "minItems"},
    "object": {"required", "propertyNames", "additionalProperties"},
    "boolean": set(),
    "null": set(),
}
SCALARS = {bool: "boolean", int: "integer", float: "number", str: "string"}


def manifest_schema() -> dict:
    """The JSON schema (draft 2020-12) of manifest.json as `Manifest.to_json` writes it."""
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": f"imagen bundle manifest, format_version {FORMAT_VERSION}",
        "description": "Generated from imagen.runtime.contract (runtime/contract/schema.py); do not edit.",
        **_record(Manifest, HEADER),
        "$defs": {cls.__name__: _record(cls) for cls in RECORDS if cls is not Manifest},
    }
    return schema


def _record(cls, header: dict | None = None) -> dict:
    properties, required = _properties(cls)
    properties = {**(header or {}), **properties}
    required = [*(header or {}), *required]
    out = {"type": "object", "properties": properties, "required": required, "additionalProperties": False}
    if cls.__doc__ and not cls.__doc__.startswith(f"{cls.__name__}("):  # not dataclass's own stand-in
        out = {"description": " ".join(cls.__doc__.split()), **out}
    return out


def _properties(cls) -> tuple[dict, list]:
    """The JSON properties of one record and which of them are required (fields without a default)."""
    hints = typing.get_type_hints(cls)
    properties, required = {}, []
    for field in dataclasses.fields(cls):
        layout = LAYOUT.get((cls, field.name))
        needed = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        if layout == "omit":
            continue
        if layout == "flatten":
            inner, inner_required = _properties(hints[field.name])
            properties.update(inner)
            required += inner_required if needed else []
            continue
        schema = _constrained(_schema_of(hints[field.name]), CONSTRAINTS.get((cls, field.name), {}))
        if layout is None:
            properties[field.name] = schema
            required += [field.name] if needed else []
            continue
        _, key, *name = layout
        group = properties.setdefault(key, {"type": "object", "properties": {}, "required": []})
        group["properties"][name[0] if name else field.name] = schema
        group["required"] += [name[0] if name else field.name] if needed else []
        group["additionalProperties"] = False
        if needed and key not in required:
            required.append(key)
    return properties, required


def _schema_of(hint) -> dict:
    """A type annotation as JSON schema: scalars, None, unions, lists and tuples, dicts keyed by
    str, and records ($ref to their definition)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is type(None):
        return {"type": "null"}
    if hint in SCALARS:
        return {"type": SCALARS[hint]}
    if origin in (typing.Union, types.UnionType):
        branches = [_schema_of(arg) for arg in args]
        if all(set(b) == {"type"} for b in branches):
            return {"type": [b["type"] for b in branches]}
        return {"anyOf": branches}
    if hint in (list, tuple) or origin in (list, tuple):
        return {"type": "array", **({"items": _schema_of(args[0])} if args else {})}
    if hint is dict or origin is dict:
        return {"type": "object", **({"additionalProperties": _schema_of(args[1])} if args else {})}
    if dataclasses.is_dataclass(hint):
        return {"$ref": f"#/$defs/{hint.__name__}"}
    raise TypeError(f"no JSON schema for the annotation {hint!r}: add it to runtime/contract/schema.py")


def _constrained(schema: dict, constraint: dict) -> dict:
    """`schema` with `constraint`'s keywords added where its type takes them (each branch of a union)."""
    if not constraint:
        return schema
    if "anyOf" in schema:
        return {"anyOf": [_constrained(branch, constraint) for branch in schema["anyOf"]]}
    kinds = schema.get("type")
    if isinstance(kinds, list):
        return {"anyOf": [_constrained({"type": kind}, constraint) for kind in kinds]}
    if kinds is None:  # a $ref: its record holds its own rules
        return schema
    out = dict(schema)
    for key, value in constraint.items():
        if key in KEYWORDS[kinds]:
            out[key] = {**out[key], **value} if isinstance(out.get(key), dict) and isinstance(value, dict) else value
    return out
