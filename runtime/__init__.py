"""Lean NumPy runtime over exported bundles: no torch, no transformers, no onnx.

from imagen.runtime import Pipeline
with Pipeline.load("bundle/") as pipe:
    result = pipe("a red circle on a blue square", steps=20, seed=0)
result.images[0].save("out.png")

The seams a host service builds on: `load_bundle` (verify a bundle), `open_backends` (one
inference backend per stage), `Pipeline.settings` (a request's checked `Settings`),
`Pipeline.generate` (a batch of `Request`s, each with its own prompts, count and seed, as one
engine batch), `encode_png` (an image's PNG bytes with the settings that reproduce it) and
`GuidedDenoiser` (one Unet call, guidance, x0 prediction, dynamic thresholding).
"""

from . import errors
from .backends import BACKENDS, open_backends
from .bundle import Bundle, load_bundle
from .contract import Settings
from .errors import (
    BackendError,
    BundleError,
    ImagenError,
    NonFiniteError,
    ParameterError,
    PromptError,
    SignatureError,
)
from .guidance import GuidedDenoiser
from .pipeline import Pipeline, Request, Result
from .png import encode_png
from .samplers import SAMPLERS

__all__ = [
    "Pipeline",
    "Request",
    "Result",
    "encode_png",
    "Settings",
    "Bundle",
    "load_bundle",
    "open_backends",
    "GuidedDenoiser",
    "errors",
    "BACKENDS",
    "SAMPLERS",
    "ImagenError",
    "BundleError",
    "PromptError",
    "ParameterError",
    "SignatureError",
    "NonFiniteError",
    "BackendError",
]
