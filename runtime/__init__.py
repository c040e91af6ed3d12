"""Lean NumPy runtime over exported bundles: no torch, no transformers, no onnx.

from imagen.runtime import Pipeline
result = Pipeline.load("bundle/")("a red circle on a blue square", steps=20, seed=0)
result.images[0].save("out.png")

The seams a host service builds on: `load_bundle` (verify a bundle), `open_backends` (one
inference backend per stage), `Pipeline.settings` (a request's checked `Settings`) and
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
from .pipeline import Pipeline, Result
from .samplers import SAMPLERS

__all__ = [
    "Pipeline",
    "Result",
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
