"""The tiny imagen-pytorch cascades (tests/imagen_pytorch_tiny.py: an `Imagen` with continuous time,
self-conditioning and the v objective on its second Unet, and an `ElucidatedImagen`, trained and saved
by imagen-pytorch 2.1.0 itself) sampled by the runtime and by imagen-pytorch's own `sample()` on the
same text embeddings: each cascade's own steps (Imagen 20 + 10; ElucidatedImagen 6 + 4, that is 11 + 7
Heun calls), guidance 3, batch 2, the same threads; best wall time of `repeats` rounds, imagen-pytorch's
in a child process (it is imported there only). Their images agree step for step with the same draws:
tests/test_imagen_pytorch_bundle.py.

    python -m bench.cpu.imagen_pytorch [--repeats 3] [--threads 2] [--json out.json]
"""

import argparse
import functools
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ..machine import machine

GUIDANCE = 3.0
BATCH = 2
TEXT = (256, 32, (10, 5))  # imagen-pytorch's T5 length, the tiny width, the two prompts' tokens


def _tests():
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
    import imagen_pytorch_sample
    import imagen_pytorch_tiny

    import runs

    return imagen_pytorch_tiny, imagen_pytorch_sample, runs


def run(repeats: int, threads: int) -> dict:
    from imagen.export.bundle import export_bundle
    from imagen.runtime import Pipeline

    tiny, sample, runs = _tests()
    length, width, tokens = TEXT
    mask = np.arange(length)[None, :] < np.array(tokens)[:, None]
    embeds = np.random.default_rng(5).standard_normal((BATCH, length, width), dtype=np.float32) * mask[..., None]
    report = {"machine": machine(), "config": {"batch": BATCH, "guidance_scale": GUIDANCE, "threads": threads}}
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        checkpoints = dict(zip(("imagen", "elucidated"), tiny.write_tiny_imagen_pytorch(root / "checkpoints")[:2]))
        t5 = runs.tiny_t5_folder(root, embed_dim=width)
        np.savez(root / "inputs.npz", text_embeds=embeds.astype(np.float32), text_masks=mask)
        for name, checkpoint in checkpoints.items():
            export_bundle(checkpoint, root / name, text_encoder=t5, ema=True, max_batch=BATCH)
            with Pipeline.load(root / name, threads=threads) as pipe:
                settings = pipe.settings(guidance_scale=GUIDANCE)
                noise = functools.partial(np.random.default_rng(0).standard_normal, dtype=np.float32)
                best = float("inf")
                for _ in range(max(1, repeats)):
                    start = time.perf_counter()
                    pipe.sample(embeds, mask, noise, settings)
                    best = min(best, time.perf_counter() - start)
                calls = pipe.model_calls(settings)
            job = dict(
                mode="time", checkpoint=str(checkpoint), ema=True, cond_scale=GUIDANCE, inputs=str(root / "inputs.npz")
            )
            job.update(repeats=max(1, repeats), threads=threads)
            upstream = float(sample.run_child(job, root / f"child-{name}")["seconds"])
            report[name] = {
                "unet_calls": calls,
                "runtime_s": best,
                "imagen_pytorch_s": upstream,
                "speedup": upstream / best,
            }
    return report


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu.imagen_pytorch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    report = run(args.repeats, args.threads)
    for name in ("imagen", "elucidated"):
        side = report[name]
        print(
            f"tiny {name}, batch {BATCH}, Unet calls {side['unet_calls']} (x2 rows with guidance): runtime "
            f"{side['runtime_s']:.3f} s, imagen-pytorch sample() {side['imagen_pytorch_s']:.3f} s, "
            f"{side['speedup']:.2f}x"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
