"""The documents made from the bundle contract (imagen.runtime.contract), so they never drift from it:
docs/manifest.schema.json (`manifest_schema()`), and in docs/bundle.md the table of the manifest's
keys and the table of stage signatures, each between its marker comments.

    python tools/contract_docs.py            # rewrite them
    python tools/contract_docs.py --check    # exit 1, naming them, when one differs (tests run this check)
"""

import argparse
import json
import sys
from pathlib import Path

from imagen.runtime.contract import text_encoder_signature, unet_signature
from imagen.runtime.contract.schema import manifest_schema

ROOT = Path(__file__).resolve().parents[1]
SCHEMA_FILE, BUNDLE_DOC = ROOT / "docs" / "manifest.schema.json", ROOT / "docs" / "bundle.md"
# Stand-ins for the sizes a signature takes, told apart from real numbers when the table is written.
L, D, S, C, MAX_BATCH = 100_001, 100_002, 100_003, 100_004, 100_005
SYMBOLS = {L: "L", D: "D", S: "s", C: "c", MAX_BATCH: "max_batch", 2 * MAX_BATCH: "2 x max_batch"}
# Where each record sits in manifest.json, for the table's first column.
WHERE = {
    "Defaults": "defaults",
    "TokenizerEntry": "tokenizer",
    "ScheduleEntry": "schedules.<name>",
    "StageEntry": "stages.<name>",
    "TensorSpec": "stages.<name>.inputs[i], .outputs[i]",
    "FileEntry": "tokenizer.files.<name>, stages.<name>.external_data[i], tensorrt.engines.<name>",
    "Parity": "stages.<name>.parity",
    "TensorRTEntry": "tensorrt",
    "Source": "source",
    "SamplingEntry": "stages.<name>.sampling",
}


def schema_text() -> str:
    return json.dumps(manifest_schema(), indent=2) + "\n"


def describe(schema: dict) -> str:
    """One property's JSON schema in words: its type, range, choices or pattern."""
    if "$ref" in schema:
        return f"`{schema['$ref'].rsplit('/', 1)[1]}`"
    if "anyOf" in schema:
        return " or ".join(describe(branch) for branch in schema["anyOf"])
    if "const" in schema:
        return f"`{json.dumps(schema['const'])}`"
    kind = schema.get("type")
    if isinstance(kind, list):
        return " or ".join(kind)
    if "enum" in schema:
        return " or ".join(f"`{json.dumps(value)}`" for value in schema["enum"])
    if kind == "array":
        items = f"list of {_grouped(describe(schema['items']))}" if "items" in schema else "list"
        return items + (f", at least {schema['minItems']}" if "minItems" in schema else "")
    if kind == "object":
        return _describe_object(schema)
    return kind + _range(schema) + (f" matching `{schema['pattern']}`" if "pattern" in schema else "")


def _describe_object(schema: dict) -> str:
    if "properties" in schema:
        return "object: " + ", ".join(f"`{key}`" for key in schema["properties"])
    text = "object"
    if "propertyNames" in schema:
        text += f" with keys matching `{schema['propertyNames']['pattern']}`"
    if "required" in schema:
        text += " (" + ", ".join(f"`{key}`" for key in schema["required"]) + " required)"
    if "additionalProperties" in schema:
        text += f", each {_grouped(describe(schema['additionalProperties']))}"
    return text


def _grouped(text: str) -> str:
    """A description of several choices in parentheses, so that the one around it stays readable."""
    return f"({text})" if " or " in text else text


def _range(schema: dict) -> str:
    low = ("[", schema["minimum"]) if "minimum" in schema else ("(", schema.get("exclusiveMinimum"))
    high = ("]", schema["maximum"]) if "maximum" in schema else (")", schema.get("exclusiveMaximum"))
    if low[1] is not None and high[1] is not None:
        return f" in {low[0]}{low[1]}, {high[1]}{high[0]}"
    if low[1] is not None:
        return f" {'>=' if low[0] == '[' else '>'} {low[1]}"
    if high[1] is not None:
        return f" {'<=' if high[0] == ']' else '<'} {high[1]}"
    return ""


def _rows(where: str, record: str, schema: dict) -> list[list[str]]:
    rows = []
    for key, prop in schema["properties"].items():
        rows.append([where, record, f"`{key}`", describe(prop), "yes" if key in schema["required"] else ""])
        if prop.get("type") == "object" and "properties" in prop:  # a group: text, batch
            for sub, inner in prop["properties"].items():
                needed = "yes" if sub in prop["required"] else ""
                rows.append([where, record, f"`{key}.{sub}`", describe(inner), needed])
    return rows


def manifest_table() -> str:
    """Every key of manifest.json, record by record, as the schema gives it."""
    schema = manifest_schema()
    rows = _rows("the top level", "Manifest", schema)
    for name, record in schema["$defs"].items():
        rows += _rows(f"`{WHERE[name]}`", name, record)
    lines = ["| in | record | key | JSON type | required |", "|---|---|---|---|---|"]
    previous = None
    for where, record, *cells in rows:
        shown = [where, f"`{record}`"] if (where, record) != previous else ["", ""]
        previous = (where, record)
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in shown + cells) + " |")
    return "\n".join(lines)


def _shape(shape) -> str:
    return "(" + ", ".join("b" if d == "batch" else SYMBOLS.get(d, str(d)) for d in shape) + ")"


def _tensors(specs) -> str:
    return ", ".join(f"`{spec.name}` {spec.dtype} {_shape(spec.shape)}" for spec in specs)


def signatures_table() -> str:
    """The stages' inputs, outputs and batch range, from the contract's signature functions."""
    stages = [
        ("`text_encoder`", text_encoder_signature(L, D, MAX_BATCH)),
        ("base Unet (`unet_0`)", unet_signature(0, S, L, D, False, MAX_BATCH, C)),
        ("super-resolution Unet (`unet_1`, ...)", unet_signature(1, S, L, D, True, MAX_BATCH, C)),
        (
            "base Unet, negative prompt and learned variance (DeepFloyd IF)",
            unet_signature(0, S, L, D, False, MAX_BATCH, C, null_text=False, learned_variance=True),
        ),
        (
            "super-resolution Unet, the same (DeepFloyd IF)",
            unet_signature(1, S, L, D, True, MAX_BATCH, C, null_text=False, learned_variance=True),
        ),
    ]
    lines = ["| stage | inputs | outputs | batch min / opt / max |", "|---|---|---|---|"]
    for name, signature in stages:
        batch = " / ".join(
            SYMBOLS.get(b, str(b)) for b in (signature.batch_min, signature.batch_opt, signature.batch_max)
        )
        lines.append(f"| {name} | {_tensors(signature.inputs)} | {_tensors(signature.outputs)} | {batch} |")
    return "\n".join(lines)


TABLES = {"manifest-keys": manifest_table, "stage-signatures": signatures_table}


def markers(name: str) -> tuple[str, str]:
    return f"<!-- contract:{name}:start (generated by tools/contract_docs.py) -->", f"<!-- contract:{name}:end -->"


def with_tables(text: str) -> str:
    """`text` with each generated table put between its markers (which must be there, once each)."""
    for name, make in TABLES.items():
        start, end = markers(name)
        if text.count(start) != 1 or text.count(end) != 1:
            raise SystemExit(f"{BUNDLE_DOC}: put the markers {start} and {end} once each where the table goes")
        head, rest = text.split(start)
        text = f"{head}{start}\n{make()}\n{end}{rest.split(end, 1)[1]}"
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only say whether the documents are current")
    args = parser.parse_args(argv)
    wanted = {SCHEMA_FILE: schema_text(), BUNDLE_DOC: with_tables(BUNDLE_DOC.read_text())}
    stale = [path for path, text in wanted.items() if not path.is_file() or path.read_text() != text]
    if args.check:
        for path in stale:
            print(f"{path.relative_to(ROOT)} differs from the contract: run python tools/contract_docs.py")
        return 1 if stale else 0
    for path in stale:
        path.write_text(wanted[path])
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
