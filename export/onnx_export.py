"""PyTorch stage -> ONNX file, FP16 conversion, checks, FLOP count and parity.

The exporter is torch.export-based (`dynamo=True`): it gives correct graphs with a
symbolic batch for both the Unets and transformers' T5 (with eager attention). The
TorchScript exporter fails on the Unet's LayerNorm here.
"""

import contextlib
import io
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from imagen.reference.text_encoder import TextEncoder
from imagen.reference.unet import Unet
from torch import nn

from imagen.runtime.contract import BATCH, StageSignature

TWO_GB = 2**31


class ExportError(RuntimeError):
    """An export step failed; the message names the stage and what to do."""


class UnetStage(nn.Module):
    """A Unet with positional inputs in signature order and the null switch `text_keep`."""

    def __init__(self, unet: Unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, time, text_embeds, text_mask, text_keep, lowres_cond_img=None, lowres_noise_times=None):
        return self.unet(x, time, text_embeds=text_embeds, text_mask=text_mask, text_keep=text_keep,
                         lowres_cond_img=lowres_cond_img, lowres_noise_times=lowres_noise_times)


class TextEncoderStage(nn.Module):
    def __init__(self, encoder: TextEncoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids, attention_mask):
        return self.encoder(input_ids, attention_mask)


def to_torch(feeds: dict[str, np.ndarray], signature: StageSignature) -> tuple:
    return tuple(torch.from_numpy(np.ascontiguousarray(feeds[name])) for name in signature.input_names)


@contextlib.contextmanager
def _quiet():
    """torch.onnx prints progress and warnings of its own; keep the command's output ours."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def export_stage(module: nn.Module, signature: StageSignature, path: Path, opset: int = 18,
                 **input_kwargs) -> list[Path]:
    """Exports `module` to `path`; returns the files written (the model, plus external data over 2 GB)."""

    module = module.eval()
    rng = np.random.default_rng(0)
    example = to_torch(signature.sample_inputs(max(2, signature.batch_opt), rng, **input_kwargs), signature)
    batch = torch.export.Dim("batch", min=1, max=max(signature.batch_max, 2))
    dynamic_shapes = tuple({0: batch} if spec.shape[0] == BATCH else None for spec in signature.inputs)
    large = sum(p.numel() * p.element_size() for p in module.parameters()) > TWO_GB * 0.9
    try:
        with _quiet(), torch.no_grad():
            program = torch.onnx.export(module, example, dynamo=True, input_names=signature.input_names,
                                        output_names=signature.output_names, dynamic_shapes=dynamic_shapes,
                                        opset_version=opset, external_data=large, optimize=True)
            program.save(str(path), external_data=large)
    except Exception as error:
        raise ExportError(f"{signature.name}: ONNX export failed: {type(error).__name__}: {error}") from error
    check_model(path, signature)
    return [path] + ([Path(f"{path}.data")] if large and Path(f"{path}.data").exists() else [])


def check_model(path: Path, signature: StageSignature) -> None:
    """onnx.checker and shape inference pass; graph inputs and outputs are the declared ones."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
        model = onnx.load(str(path), load_external_data=False)
    except Exception as error:
        raise ExportError(f"{signature.name}: {path.name} fails onnx.checker: {error}") from error
    names = [i.name for i in model.graph.input]
    if names != signature.input_names:
        raise ExportError(f"{signature.name}: graph inputs {names} differ from the signature {signature.input_names}")
    outputs = [o.name for o in model.graph.output]
    if outputs != signature.output_names:
        raise ExportError(f"{signature.name}: graph outputs {outputs} differ from {signature.output_names}")


def convert_fp16(src: Path, dst: Path) -> None:
    """FP16 weights and math with FP32 inputs and outputs (casts at the graph edges)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    with _quiet():
        half = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=False)
    _sort_topologically(half.graph)  # the converter appends its input casts at the end
    del half.graph.value_info[:]  # it also leaves stale float32 annotations on FP16 tensors
    large = sum(int(np.prod(t.dims)) * 2 for t in half.graph.initializer) > TWO_GB * 0.9
    onnx.save(half, str(dst), save_as_external_data=large)


def _sort_topologically(graph) -> None:
    """Reorder a graph's nodes so that every input is produced before it is read (Kahn's order,
    stable: nodes keep their relative order where the data allows)."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(name in available for name in n.input)]
        if not ready:
            missing = sorted({name for n in pending for name in n.input} - available)[:5]
            raise ExportError(f"graph has inputs that no node produces: {missing}")
        chosen = {id(n) for n in ready}
        for node in ready:
            ordered.append(node)
            available.update(node.output)
        pending = [n for n in pending if id(n) not in chosen]
    del graph.node[:]
    graph.node.extend(ordered)


def count_flops(module: nn.Module, signature: StageSignature, **input_kwargs) -> int:
    """FLOPs of one call at batch 1 (2 x multiply-adds of matmuls and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    inputs = to_torch(signature.sample_inputs(1, np.random.default_rng(0), **input_kwargs), signature)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        module(*inputs)
    return int(counter.get_total_flops())


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    """||a - b|| / ||b||, in float64; inf when a has non-finite values."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    if not np.isfinite(a64).all():
        return float("inf")
    denominator = np.linalg.norm(b64)
    return float(np.linalg.norm(a64 - b64) / (denominator if denominator > 0 else 1.0))


def measure_parity(module: nn.Module, signature: StageSignature, path: Path, batch_sizes=(1, 3),
                   seed: int = 0, threads: int | None = None, **input_kwargs) -> list[float]:
    """Relative error of ONNX Runtime (CPU) against the PyTorch stage, per batch size."""
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
            expected = module(*to_torch(feeds, signature)).numpy()
        (got,) = session.run(signature.output_names, feeds)
        if got.shape != expected.shape:
            raise ExportError(f"{signature.name}: ONNX output shape {got.shape} != reference {expected.shape} "
                              f"at batch {batch}")
        errors.append(relative_error(got, expected))
    return errors
