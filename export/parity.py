"""What export measures of a stage against its PyTorch module: the relative error of the written
ONNX file on ONNX Runtime (CPU) per batch size, and the FLOPs of one call. `relative_error` is the
one measure of closeness that export, the engine checks and the tests use."""

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from imagen.runtime.contract import StageSignature

from .errors import ExportError
from .onnx_export import to_torch


def count_flops(module: nn.Module, signature: StageSignature, **input_kwargs) -> int:
    """FLOPs of one call at batch 1 (2 x multiply-adds of matmuls and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    inputs = to_torch(signature.sample_inputs(1, np.random.default_rng(0), **input_kwargs), signature)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        module(*inputs)
    return int(counter.get_total_flops())


def relative_error(a, b) -> float:
    """||a - b|| / ||b|| of two host arrays (NumPy, or anything np.asarray takes: torch CPU tensors,
    lists), in float64; ||a - b|| when b is zero; inf when a has non-finite values. Device arrays are
    refused (CuPy raises TypeError): bring them to the host first."""
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if not np.isfinite(a64).all():
        return float("inf")
    denominator = np.linalg.norm(b64)
    return float(np.linalg.norm(a64 - b64) / (denominator if denominator > 0 else 1.0))


def measure_parity(
    module: nn.Module,
    signature: StageSignature,
    path: Path,
    batch_sizes=(1, 3),
    seed: int = 0,
    threads: int | None = None,
    **input_kwargs,
) -> list[float]:
    """Relative error of ONNX Runtime (CPU) against the PyTorch stage, per batch size: the largest
    over the stage's outputs (a Unet with a learned variance has two)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or max(1, os.cpu_count() or 1)
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    errors = []
    for batch in batch_sizes:
        feeds = signature.sample_inputs(batch, rng, **input_kwargs)
        with torch.no_grad():
            expected = module(*to_torch(feeds, signature))
        expected = [t.numpy() for t in (expected if isinstance(expected, (tuple, list)) else (expected,))]
        outputs = session.run(signature.output_names, feeds)
        if len(outputs) != len(expected):
            raise ExportError(
                f"{signature.name}: the ONNX file has {len(outputs)} outputs, the reference {len(expected)}"
            )
        worst = 0.0
        for name, got, want in zip(signature.output_names, outputs, expected, strict=True):
            if got.shape != want.shape:
                raise ExportError(
                    f"{signature.name}: ONNX output {name} shape {got.shape} != reference {want.shape} at batch {batch}"
                )
            worst = max(worst, relative_error(got, want))
        errors.append(worst)
    return errors
