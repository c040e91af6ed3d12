"""The tiny DeepFloyd IF cascade (tests/deepfloyd_tiny.py: diffusers' own IF test configurations,
stage I 32x32 and stage II 64x64) run by the runtime and by diffusers' `IFPipeline` +
`IFSuperResolutionPipeline` on the same request: IF's defaults (100 + 50 steps, guidance 7 and 4,
the empty negative prompt), the same prompts and threads: wall time per batch, best of `repeats`
interleaved rounds. (Their images agree step for step with the same draws: tests/test_deepfloyd_bundle.py.)

    python -m bench.cpu.deepfloyd [--batch 2] [--repeats 3] [--threads 2] [--json out.json]
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ..machine import machine

PROMPTS = ["a red circle on the left", "a blue square on the top of a white background"]


def _tiny_if(root: Path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
    from deepfloyd_tiny import write_tiny_if

    return write_tiny_if(root)


def run(batch: int, repeats: int, threads: int) -> dict:
    import torch
    from diffusers import IFPipeline, IFSuperResolutionPipeline

    from imagen.export.bundle import export_bundle
    from imagen.runtime import Pipeline

    torch.set_num_threads(threads)
    prompts = (PROMPTS * batch)[:batch]
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        stage_1, stage_2 = _tiny_if(root)
        export_bundle(stage_1, root / "bundle", stage2=stage_2, max_batch=batch)
        pipe = Pipeline.load(root / "bundle", threads=threads)
        parts = dict(safety_checker=None, feature_extractor=None, watermarker=None, requires_safety_checker=False)
        first = IFPipeline.from_pretrained(stage_1, **parts)
        second = IFSuperResolutionPipeline.from_pretrained(stage_2, text_encoder=None, tokenizer=None, **parts)
        for pipeline in (first, second):
            pipeline.set_progress_bar_config(disable=True)

        def runtime():
            return pipe(prompts, seed=0).array

        def diffusers():
            with torch.no_grad():
                embeds, negative = first.encode_prompt(prompts, clean_caption=True)
                low = first(prompt_embeds=embeds, negative_prompt_embeds=negative, output_type="pt").images
                high = second(image=low, prompt_embeds=embeds, negative_prompt_embeds=negative, output_type="pt").images
            return ((high / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)

        sides = {"runtime": runtime, "diffusers": diffusers}
        best = {name: float("inf") for name in sides}
        for _ in range(max(1, repeats)):
            for name, side in sides.items():
                start = time.perf_counter()
                side()
                best[name] = min(best[name], time.perf_counter() - start)
        settings = pipe.settings()
    return {
        "machine": machine(),
        "config": {
            "batch": batch,
            "steps": list(settings.steps),
            "guidance_scale": settings.guidance_scale,
            "sampler": settings.sampler,
            "threads": threads,
            "repeats": repeats,
        },
        "runtime_s": best["runtime"],
        "diffusers_s": best["diffusers"],
        "speedup": best["diffusers"] / best["runtime"],
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu.deepfloyd", description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    report = run(args.batch, args.repeats, args.threads)
    print(
        f"tiny IF, batch {args.batch}, steps {report['config']['steps']}: runtime {report['runtime_s']:.2f} s, "
        f"diffusers {report['diffusers_s']:.2f} s, {report['speedup']:.2f}x"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
