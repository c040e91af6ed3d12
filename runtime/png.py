"""PNG files with the settings that reproduce them: what imagen-run writes and imagen-serve and the
Ray app answer, made by one function.

The text chunks are the image's info (`requests.image_info`) under these keys, as text: the prompt,
the negative prompt (only when its request gave one), the seed, the sampler, the steps per Unet
(JSON), eta, sr_strength, the guidance scale (JSON, a list where it differs per Unet), the
bundle's hash, the engine and the Unets' precision. `Pipeline.load(bundle, backend=..., precision=...)`
then `pipe(prompt, negative_prompt=..., seed=..., steps=..., ...)` makes the image again (bit for bit
on the same machine).
"""

import io
import json

import numpy as np

PNG_TEXT_KEYS = (
    "prompt",
    "negative_prompt",
    "seed",
    "sampler",
    "steps",
    "eta",
    "sr_strength",
    "guidance_scale",
    "bundle_sha",
    "backend",
    "precision",
)


def png_text(info: dict) -> dict[str, str]:
    """The text chunks of an image with this info (a key that is None is left out: a seed from a caller's
    generator, a request without a negative prompt)."""
    text = {}
    for key in PNG_TEXT_KEYS:
        value = info.get(key)
        if value is not None:
            text[key] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return text


def encode_png(image, info: dict) -> bytes:
    """PNG bytes of a uint8 (h, w, 3) image (an array or a PIL image) with `png_text(info)` as text chunks."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    metadata = PngInfo()
    for key, value in png_text(info).items():
        metadata.add_text(key, value)
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(np.asarray(image))).save(buffer, format="PNG", pnginfo=metadata)
    return buffer.getvalue()
