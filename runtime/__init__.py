"""Lean NumPy runtime over exported bundles: no torch, no transformers, no onnx.

from imagen.runtime import Pipeline
result = Pipeline.load("bundle/")("a red circle on a blue square", steps=20, seed=0)
result.images[0].save("out.png")
"""

from . import errors
from .bundle import Manifest, load_manifest
from .errors import (
    BackendError,
    BundleError,
    ImagenError,
    NonFiniteError,
    ParameterError,
    PromptError,
    SignatureError,
)
from .pipeline import Pipeline, Result
from .samplers import SAMPLERS

__all__ = [
    "Pipeline",
    "Result",
    "Manifest",
    "load_manifest",
    "errors",
    "SAMPLERS",
    "ImagenError",
    "BundleError",
    "PromptError",
    "ParameterError",
    "SignatureError",
    "NonFiniteError",
    "BackendError",
]
