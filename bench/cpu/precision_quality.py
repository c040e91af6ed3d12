"""bf16's quality gate on prompt adherence: `imagen-eval`'s captions generated at FP32 and with bf16
Unets, paired (same captions, same seeds), on a CPU with native bf16 (docs/cpu-backends.md).

    python -m bench.cpu.precision_quality                         # seeds 0 and 10000, n = 96 per split
    python -m bench.cpu.precision_quality --seeds 0 10000 20000 30000 --json quality.json
    python -m bench.cpu.precision_quality --rows fp32 auto reversed fp32/bf16 bf16/fp32

Rows: "fp32" (ONNX Runtime, today's images), "bf16" (every Unet on OpenVINO bf16, `--precision
bf16`), "auto" (what `--precision auto` runs where bf16 is measured faster: the base Unet on ONNX
Runtime FP32 for timesteps >= 3/4 T and OpenVINO bf16 below, the super-resolution Unets bf16), and
for comparison "reversed" (the base Unet bf16 above 3/4 T, FP32 below), "fp32/bf16" (only the
super-resolution Unets bf16) and "bf16/fp32" (only the base Unet bf16). Per split: exact match and
each attribute, the difference from FP32 with a 95% interval of the paired difference, and the
discordant pairs with McNemar's exact test. The gate: exact match within 2 points of FP32, colour,
shape and position within 3, on both splits.
"""

import argparse
import json
import math
import sys

from ..machine import machine
from ..markdown import table

ROWS = ("fp32", "bf16", "auto", "reversed", "fp32/bf16", "bf16/fp32")
DEFAULT_ROWS = ("fp32", "bf16", "auto")
ATTRIBUTES = ("exact", "colour", "shape", "position")
GATE_POINTS = {"exact": 2.0, "colour": 3.0, "shape": 3.0, "position": 3.0}


def pipelines(threads: int) -> dict:
    """Each row's pipeline; the mixed rows share the FP32 and bf16 pipelines' engines."""
    from imagen.runtime import Pipeline
    from imagen.runtime.backends import SplitBackend
    from imagen.runtime.backends.choice import switch_time

    fp32 = Pipeline.load(backend="onnxruntime", precision="fp32", threads=threads)
    bf16 = Pipeline.load(backend="openvino", precision="bf16", threads=threads)

    def mixed(engines: dict):
        return Pipeline(fp32.bundle, {**fp32.backends, **engines}, fp32.tokenizer, "mixed")

    base, rest = fp32.bundle.unets[0].name, [stage.name for stage in fp32.bundle.unets[1:]]
    switch = switch_time(fp32.bundle, base)
    upper = {name: bf16.backends[name] for name in rest}
    return {
        "fp32": fp32,
        "bf16": bf16,
        "auto": mixed({base: SplitBackend(fp32.backends[base], bf16.backends[base], switch), **upper}),
        "reversed": mixed({base: SplitBackend(bf16.backends[base], fp32.backends[base], switch), **upper}),
        "fp32/bf16": mixed(upper),
        "bf16/fp32": mixed({base: bf16.backends[base]}),
    }


def mcnemar(only_first: int, only_second: int) -> float:
    """Two-sided exact p-value of McNemar's test on the discordant pairs."""
    total = only_first + only_second
    if total == 0:
        return 1.0
    tail = sum(math.comb(total, k) for k in range(min(only_first, only_second) + 1)) / 2**total
    return min(1.0, 2 * tail)


def compare(reference: list[dict], rows: list[dict]) -> dict:
    """Rates, paired differences (points, with a 95% interval) and discordant pairs of `rows` against
    `reference`, image by image."""
    n, out = len(reference), {"n": len(reference)}
    for attribute in ATTRIBUTES:
        a = [bool(row[attribute]) for row in reference]
        b = [bool(row[attribute]) for row in rows]
        differences = [int(y) - int(x) for x, y in zip(a, b, strict=True)]
        mean = sum(differences) / n
        spread = math.sqrt(sum((d - mean) ** 2 for d in differences) / max(n - 1, 1))
        half = 1.96 * spread / math.sqrt(n)
        only_a = sum(x and not y for x, y in zip(a, b, strict=True))
        only_b = sum(y and not x for x, y in zip(a, b, strict=True))
        out[attribute] = {
            "rate": 100 * sum(b) / n,
            "difference": 100 * mean,
            "interval": [100 * (mean - half), 100 * (mean + half)],
            "discordant": [only_a, only_b],
            "p": mcnemar(only_a, only_b),
        }
    out["passed"] = all(-out[a]["difference"] <= GATE_POINTS[a] for a in ATTRIBUTES)
    return out


def run(seeds, n: int, threads: int, rows=ROWS, progress=print) -> dict:
    from imagen.shapes.evaluate import evaluate

    pipes = pipelines(threads)
    scored = {row: {"train": [], "heldout": []} for row in rows}
    for row in rows:
        for split in ("train", "heldout"):
            for seed in seeds:
                report = evaluate(pipes[row], split, n, batch_size=8, seed=seed)
                scored[row][split] += report["rows"]
                progress(f"{row} {split} seed {seed}: exact {100 * report['accuracy']['exact']:.1f}%")
    results = {}
    for row in rows:
        for split in ("train", "heldout"):
            results[f"{row} {split}"] = compare(scored["fp32"][split], scored[row][split])
    return {"machine": machine(), "seeds": list(seeds), "n_per_seed": n, "results": results}


def markdown(report: dict) -> str:
    rows = []
    for key, result in report["results"].items():
        name, split = key.rsplit(" ", 1)
        exact = result["exact"]
        cells = [name, split, str(result["n"]), f"{exact['rate']:.1f}%"]
        if name == "fp32":
            cells += ["", "", "", ""]
        else:
            low, high = exact["interval"]
            cells += [
                f"{exact['difference']:+.1f} ({low:+.1f} to {high:+.1f})",
                f"{exact['discordant'][0]} / {exact['discordant'][1]}, p = {exact['p']:.2f}",
                " / ".join(f"{result[a]['difference']:+.1f}" for a in ATTRIBUTES[1:]),
                "yes" if result["passed"] else "no",
            ]
        rows.append(cells)
    header = [
        "Unets",
        "captions",
        "images",
        "exact",
        "vs fp32 (95%)",
        "fp32 only / other only",
        "colour / shape / position",
        "gate",
    ]
    return "\n".join(table(header, rows))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu.precision_quality", description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 10000])
    parser.add_argument("--n", type=int, default=96, help="captions per split and seed")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", nargs="+", default=list(DEFAULT_ROWS), choices=ROWS)
    parser.add_argument("--json", default=None, help="also write the report here")
    args = parser.parse_args(argv)
    rows = ["fp32", *[row for row in args.rows if row != "fp32"]]
    report = run(args.seeds, args.n, args.threads, rows, progress=lambda line: print(line, file=sys.stderr, flush=True))
    print(markdown(report))
    if args.json:
        with open(args.json, "w") as file:
            json.dump(report, file, indent=1)


if __name__ == "__main__":
    main()
