"""Stored SHA-256 digests of the demo bundle's images on ONNX Runtime CPU, for the request flows.

`python tests/golden.py` prints the digests that the current code makes on this machine, as
JSON, under this machine's key. tests/data/golden_images.json holds the digests taken on
2026-12-05 with the code before the request flow was written once (Pipeline.__call__ and the
server's own batch function); tests/test_golden_images.py holds every request flow to them.

ONNX Runtime's CPU kernels differ by instruction set and release, and so do their last bits: the
digests are kept per `machine_key()` and the test skips, naming the key, on a machine that has
none. Add a machine's digests only from code known to make the images it made before.
"""

import hashlib
import json
import platform
import sys

import numpy as np

# the instruction-set extensions that choose ONNX Runtime's MLAS kernels
KERNEL_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "asimd", "sve")
RED_CIRCLE = "a small red circle on the left"
BLUE_SQUARE = "a large blue square at the top"

# name -> Pipeline.__call__ arguments; every sampler, several images per prompt, sr_strength 1
CALLS = {
    # the demo's defaults when the digests were taken (named here, so a change of defaults keeps them)
    "defaults": dict(prompts=[RED_CIRCLE, BLUE_SQUARE], seed=7, sampler="dpmpp_2m", steps=25, sr_strength=0.25),
    "ddpm_two_per_prompt": dict(
        prompts=RED_CIRCLE, seed=3, sampler="ddpm", steps=[10, 4], num_images_per_prompt=2, sr_strength=0.25
    ),
    "ddim_eta_full_sr": dict(prompts=BLUE_SQUARE, seed=11, sampler="ddim", eta=0.5, steps=8, sr_strength=1.0),
    "dpmpp_guidance_5": dict(
        prompts=[BLUE_SQUARE], seed=2**31 + 5, sampler="dpmpp_2m", guidance_scale=5.0, steps=[6, 6], sr_strength=0.25
    ),
}
# name -> requests (prompt, n, seed) that run as one server batch with these shared settings
BATCHES = {
    "two_requests": dict(
        requests=[(RED_CIRCLE, 2, 1), (BLUE_SQUARE, 1, 2)], settings=dict(sampler="dpmpp_2m", steps=6, sr_strength=0.25)
    ),
    "ddpm_three_requests": dict(
        requests=[(BLUE_SQUARE, 1, 5), (RED_CIRCLE, 1, 6), (BLUE_SQUARE, 1, 7)],
        settings=dict(sampler="ddpm", steps=[8, 3], guidance_scale=4.0, sr_strength=0.25),
    ),
}


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def machine_key() -> str:
    """ONNX Runtime's release, the architecture and the kernel-choosing CPU flags."""
    import onnxruntime

    flags = sorted(cpu_flags().intersection(KERNEL_FLAGS))
    return f"onnxruntime-{onnxruntime.__version__}/{platform.machine()}/{'+'.join(flags) or 'none'}"


def digest(images: np.ndarray) -> str:
    """SHA-256 of uint8 (n, h, w, 3) images, with their shape."""
    images = np.ascontiguousarray(images, dtype=np.uint8)
    return hashlib.sha256(repr(images.shape).encode() + images.tobytes()).hexdigest()


def stored(path) -> dict[str, str] | None:
    """This machine's stored digests, or None."""
    with open(path) as file:
        return json.load(file).get(machine_key())


if __name__ == "__main__":  # the digests the current code makes here (see the module docstring)
    from imagen.runtime import Pipeline
    from imagen.runtime.serve import engine

    pipe = Pipeline.load(threads=2)
    digests = {name: digest(pipe(**call).array) for name, call in CALLS.items()}
    for name, batch in BATCHES.items():
        requests = [engine.prepare(pipe, p, n, seed=s, **batch["settings"]) for p, n, s in batch["requests"]]
        from io import BytesIO

        from PIL import Image

        images = [np.asarray(Image.open(BytesIO(png))) for out in engine.run_batch(pipe, requests) for png in out.pngs]
        digests[name] = digest(np.stack(images))
    json.dump({machine_key(): digests}, sys.stdout, indent=2)
    print()
