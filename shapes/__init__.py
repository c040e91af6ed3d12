"""The built-in `shapes` data set and a prompt-adherence evaluator over it."""

from .analyse import DetectedObject, analyse, background_error, score
from .scenes import ATTRIBUTES, COLOURS, HELDOUT_PAIRS, POSITIONS, SHAPES, SIZES, Scene, ShapesDataset, captions, render

__all__ = [
    "ATTRIBUTES",
    "COLOURS",
    "HELDOUT_PAIRS",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "DetectedObject",
    "Scene",
    "ShapesDataset",
    "analyse",
    "background_error",
    "captions",
    "render",
    "score",
]
