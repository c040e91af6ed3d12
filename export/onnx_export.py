"""PyTorch stage -> ONNX file: the stage modules with positional inputs in signature order, the
export itself and the checks of what it wrote. FP16 conversion is in `fp16`, external data in
`external_data`, parity and FLOPs in `parity`.

The exporter is torch.export-based (`dynamo=True`): it gives correct graphs with a
symbolic batch for both the Unets and transformers' T5 (with eager attention). The
TorchScript exporter fails on the Unet's LayerNorm here.
"""

import contextlib
import io
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from imagen.reference.text_encoder import TextEncoder
from imagen.reference.unet import Unet
from imagen.runtime.contract import BATCH, StageSignature

from .errors import ExportError
from .external_data import EXTERNAL_DATA_THRESHOLD, external_data_files

STACK_TRACE = "pkg.torch.onnx.stack_trace"  # node metadata naming the exporting machine's source paths


class UnetStage(nn.Module):
    """A Unet with positional inputs in signature order and the null switch `text_keep`."""

    def __init__(self, unet: Unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, time, text_embeds, text_mask, text_keep, lowres_cond_img=None, lowres_noise_times=None):
        return self.unet(
            x,
            time,
            text_embeds=text_embeds,
            text_mask=text_mask,
            text_keep=text_keep,
            lowres_cond_img=lowres_cond_img,
            lowres_noise_times=lowres_noise_times,
        )


class TextEncoderStage(nn.Module):
    def __init__(self, encoder: TextEncoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids, attention_mask):
        return self.encoder(input_ids, attention_mask)


def to_torch(feeds: dict[str, np.ndarray], signature: StageSignature) -> tuple:
    return tuple(torch.from_numpy(np.ascontiguousarray(feeds[name])) for name in signature.input_names)


@contextlib.contextmanager
def quiet():
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


def export_stage(
    module: nn.Module,
    signature: StageSignature,
    path: Path,
    opset: int = 18,
    *,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
    **input_kwargs,
) -> list[Path]:
    """Exports `module` to `path`; returns the files written: the model, then its external data files.

    Weights go to `<name>.onnx.data` when they exceed `external_data_threshold` bytes (torch also
    does so on its own above 1.5 GB); the list comes from the saved model's tensor locations."""

    module = module.eval()
    rng = np.random.default_rng(0)
    example = to_torch(signature.sample_inputs(max(2, signature.batch_opt), rng, **input_kwargs), signature)
    batch = torch.export.Dim("batch", min=1, max=max(signature.batch_max, 2))
    dynamic_shapes = tuple({0: batch} if spec.shape[0] == BATCH else None for spec in signature.inputs)
    large = weight_bytes(module) > external_data_threshold
    try:
        with quiet(), torch.no_grad():
            program = torch.onnx.export(
                module,
                example,
                dynamo=True,
                input_names=signature.input_names,
                output_names=signature.output_names,
                dynamic_shapes=dynamic_shapes,
                opset_version=opset,
                optimize=True,
            )
            _strip_stack_traces(program.model)
            program.save(str(path), external_data=large)
    except Exception as error:
        raise ExportError(f"{signature.name}: ONNX export failed: {type(error).__name__}: {error}") from error
    check_model(path, signature)
    return [path] + external_data_files(path)


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


def weight_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def _strip_stack_traces(model) -> None:
    """The exporter records each node's Python stack, absolute paths of this machine included; a
    bundle is shipped elsewhere, so those go (the node's module and class names stay)."""
    for graph in (model.graph, *model.functions.values()):
        for node in graph.all_nodes():
            node.metadata_props.pop(STACK_TRACE, None)
