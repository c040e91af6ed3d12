"""MinImagen's own presets end to end with random weights: the Base Unet at 64x64 (dim 512) and
the Super Unet 64 -> 256 (dim 128), as `imagen-train --unet Base --unet Super` and the article
name them, over a T5-small-shaped encoder (d_model 512, 6 layers; random weights, byte tokens).

    python -m bench.cpu.presets                  # writes under /tmp/imagen-presets, prints a table
    python -m bench.cpu.presets --work DIR --json results.json --precisions fp32

Steps, each skipped when its output exists (a rerun resumes): parameter counts (meta device, no
memory); a MinImagen training directory with seeded random weights (parameters/*.json and
state_dicts/*.pth, as its training script writes them); `export_bundle` of it to an FP32 and an
FP16 bundle with the default sampler DPM-Solver++(2M), 25 steps, sr_strength 1 (with force: a
stage over its parity tolerance is written, and the table says so); then one image per bundle
in a fresh process (as bench/cpu/memory.py does): wall time, peak RSS, seconds per stage. Stages
over 2 GB are written with ONNX external data.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

PRESETS = (("Base", 64), ("Super", 256))  # (Unet preset, image size), MinImagen's Imagen numbers
STAMP = "20221127_000000"
TEXT_WIDTH = 512  # t5-small's d_model
MAX_LENGTH = 256  # MinImagen's text length
TWO_GB = 2**31
PROMPT = "a small red circle on the left"
REPO = Path(__file__).resolve().parents[2]  # children run `-m bench.cpu.presets` from here


def _peak_rss() -> int:
    """This process's peak resident memory in bytes (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def parameter_counts(presets=PRESETS, text_embed_dim: int = TEXT_WIDTH) -> list[dict]:
    """Parameters and FP32/FP16 bytes of each preset Unet, built on the meta device."""
    import torch

    from imagen.reference.imagen import cast_unet_config
    from imagen.reference.unet import Unet, preset_config

    rows = []
    for index, (name, size) in enumerate(presets):
        with torch.device("meta"):
            unet = Unet(cast_unet_config(preset_config(name), index, text_embed_dim, 3))
        count = sum(p.numel() for p in unet.parameters())
        rows.append(
            {
                "stage": f"unet_{index}",
                "preset": name,
                "image_size": size,
                "parameters": count,
                "fp32_bytes": 4 * count,
                "fp16_bytes": 2 * count,
                "external_data_fp32": 4 * count > TWO_GB,
                "external_data_fp16": 2 * count > TWO_GB,
            }
        )
    return rows


def write_text_encoder(folder: Path) -> None:
    """A T5-small-shaped encoder with seeded random weights and byte-level tokens."""
    import torch
    from transformers import T5EncoderModel

    from imagen.reference.text_encoder import ByteTokenizer, TextEncoder, tiny_t5_config

    config = tiny_t5_config(vocab_size=384, d_model=512, num_layers=6, num_heads=8)  # d_kv 64, as t5-small
    config.d_ff = 2048
    torch.manual_seed(0)
    model = T5EncoderModel(config)
    model.config._attn_implementation = "eager"
    TextEncoder(model, ByteTokenizer(MAX_LENGTH)).save(folder)


def write_training_directory(root: Path, presets=PRESETS, text_embed_dim: int = TEXT_WIDTH) -> None:
    """parameters/ and state_dicts/ as MinImagen's training script writes them, with seeded random
    weights; one Unet in memory at a time."""
    import torch

    from imagen.reference.imagen import cast_unet_config
    from imagen.reference.minimagen import minimagen_imagen_params
    from imagen.reference.unet import Unet, preset_config

    for sub in ("parameters", "state_dicts", "tmp"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    imagen_params = minimagen_imagen_params([size for _, size in presets], timesteps=1000)
    (root / "parameters" / f"imagen_params_{STAMP}.json").write_text(json.dumps(imagen_params, indent=4))
    for index, (name, _) in enumerate(presets):
        config = preset_config(name)
        params = {k: v for k, v in config.to_dict().items() if k != "max_text_len"}  # every MinImagen argument
        (root / "parameters" / f"unet_{index}_params_{STAMP}.json").write_text(json.dumps(params, indent=4))
        torch.manual_seed(index)
        unet = Unet(cast_unet_config(config, index, text_embed_dim, 3))
        torch.save(unet.state_dict(), root / "state_dicts" / f"unet_{index}_state_{STAMP}.pth")
        del unet


def export_child(training: str, t5: str, out: str, precision: str) -> dict:
    """Runs in a fresh process: one export, its time and peak RSS, the manifest's parity and files."""
    from imagen.export.bundle import export_bundle

    start = time.perf_counter()
    manifest = export_bundle(
        training,
        out,
        text_encoder=t5,
        fp16=precision == "fp16",
        max_batch=1,
        sampler="dpmpp_2m",
        steps=25,
        sr_strength=1.0,
        force=True,
        report=lambda message: print(message, file=sys.stderr, flush=True),
    )
    stages = {
        name: {
            "precision": s.precision,
            "parity_max_rel_error": max(s.parity.rel_error),
            "parity_passed": s.parity.passed,
            "onnx_bytes": s.file.bytes,
            "external_data_bytes": sum(e.bytes for e in s.external_data),
            "flops": s.flops,
        }
        for name, s in manifest.stages.items()
    }
    return {"export_s": time.perf_counter() - start, "export_peak_rss_bytes": _peak_rss(), "stages": stages}


def image_child(bundle: str, threads: int) -> dict:
    """Runs in a fresh process: load the bundle, one image at its default settings. The load
    averages before and after tell whether other work shared the CPUs."""
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    from imagen.runtime import Pipeline

    pipe = Pipeline.load(bundle, backend="onnxruntime", threads=threads)
    loaded = time.perf_counter()
    settings = pipe.settings(seed=0)
    result = pipe(
        [PROMPT],
        sampler=settings.sampler,
        steps=list(settings.steps),
        sr_strength=settings.sr_strength,
        guidance_scale=settings.guidance_scale,
        seed=0,
    )
    timings = result.info[0]["timings"]
    return {
        "load_s": loaded - start,
        "image_s": timings["total"],
        "peak_rss_bytes": _peak_rss(),
        "settings": {"sampler": settings.sampler, "steps": list(settings.steps), "sr_strength": settings.sr_strength},
        "stage_s": {k: v for k, v in timings.items() if k.startswith("engine:")},
        "pixel_std": float(result.array.std()),
        "load_average": [load_before, os.getloadavg()[0]],
    }


def _child(kind: str, *args, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    command = [sys.executable, "-m", "bench.cpu.presets", "--child", kind, *map(str, args), "--threads", str(threads)]
    start = time.perf_counter()
    result = subprocess.run(
        command, env=env, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2]
    )
    if result.returncode != 0:
        return {"error": f"{kind} child exited with {result.returncode}; see its stderr above"}
    line = next(line for line in result.stdout.splitlines() if line.startswith("BENCH"))
    return {**json.loads(line[len("BENCH") :]), "process_wall_s": time.perf_counter() - start}


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def run(work: Path, precisions: list[str], threads: int, results_file: Path, presets=PRESETS) -> dict:
    from ..machine import machine

    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    results.update(machine=machine(), threads=threads, stages=parameter_counts(presets))

    def save():
        results_file.write_text(json.dumps(results, indent=2))

    save()
    training, t5 = work / "training", work / "t5"
    if not (t5 / "config.json").is_file():
        write_text_encoder(t5)
    if not list((training / "state_dicts").glob("unet_1_*.pth")):
        start = time.perf_counter()
        write_training_directory(training, presets)
        results["write_training_s"] = time.perf_counter() - start
        save()
    for precision in precisions:
        entry = results.setdefault(precision, {})
        bundle = work / f"bundle-{precision}"
        if not (bundle / "manifest.json").is_file() or "export_s" not in entry:
            print(f"exporting {precision} bundle to {bundle}", file=sys.stderr, flush=True)
            exported = _child("export", training, t5, bundle, precision, threads=threads)
            exported.pop("process_wall_s", None)  # the image's is the one reported
            entry.update(exported)
            save()
        if (bundle / "manifest.json").is_file():
            entry["bundle_bytes"] = folder_bytes(bundle)
            if "image_s" not in entry:
                print(f"one image from the {precision} bundle", file=sys.stderr, flush=True)
                entry.update(_child("image", bundle, threads=threads))
            save()
    return results


def table(results: dict) -> str:
    """The results as Markdown: one row per bundle."""
    rows = [
        "| bundle | size (external data) | export (peak RSS) | Unet parity, max rel. error | load + 1 image "
        "| image | peak RSS | base / super engine s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for precision in ("fp32", "fp16"):
        r = results.get(precision)
        if not r or "export_s" not in r:
            rows.append(f"| {precision} | {(r or {}).get('error', 'not run')} | | | | | | |")
            continue
        stages = {k: v for k, v in r["stages"].items() if k.startswith("unet_")}
        external = sum(s["external_data_bytes"] for s in r["stages"].values())
        parity = " / ".join(
            f"{s['parity_max_rel_error']:.1e}{'' if s['parity_passed'] else ' (over)'}" for s in stages.values()
        )
        row = (
            f"| {precision} | {r.get('bundle_bytes', 0) / 1e9:.2f} GB ({external / 1e9:.2f} GB) "
            f"| {r['export_s'] / 60:.0f} min ({r['export_peak_rss_bytes'] / 1e9:.1f} GB) | {parity} "
        )
        if "image_s" in r:
            stage = r["stage_s"]
            row += (
                f"| {r['process_wall_s']:.0f} s | {r['image_s']:.0f} s | {r['peak_rss_bytes'] / 1e9:.2f} GB "
                f"| {stage.get('engine:unet_0', 0):.0f} / {stage.get('engine:unet_1', 0):.0f} |"
            )
        else:
            row += f"| {r.get('error', 'not run')} | | | |"
        rows.append(row)
    return "\n".join(rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu.presets", description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/imagen-presets"), help="folder for everything")
    parser.add_argument("--precisions", default="fp32,fp16")
    parser.add_argument("--threads", type=int, default=None, help="default: this process's CPUs")
    parser.add_argument("--json", type=Path, default=None, help="results file (default: WORK/results.json)")
    parser.add_argument(
        "--presets",
        default="Base:64,Super:256",
        help="PRESET:SIZE per Unet (e.g. BaseTest:16,SuperTest:32 for a smoke run)",
    )
    parser.add_argument("--counts", action="store_true", help="only the parameter counts")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    from ..machine import logical_cpus

    threads = args.threads or logical_cpus()
    presets = tuple((name, int(size)) for name, size in (p.split(":") for p in args.presets.split(",")))
    if args.child:
        kind, *rest = args.child
        out = export_child(*rest) if kind == "export" else image_child(rest[0], threads)
        print("BENCH" + json.dumps(out), flush=True)
        return
    if args.counts:
        print(json.dumps(parameter_counts(presets), indent=2))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    results = run(args.work, args.precisions.split(","), threads, args.json or args.work / "results.json", presets)
    print(json.dumps(results["stages"], indent=2))
    print(table(results))


if __name__ == "__main__":
    main()
