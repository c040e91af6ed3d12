"""PyTorch stage -> ONNX file, FP16 conversion, checks, FLOP count and parity.

The exporter is torch.export-based (`dynamo=True`): it gives correct graphs with a
symbolic batch for both the Unets and transformers' T5 (with eager attention). The
TorchScript exporter fails on the Unet's LayerNorm here.
"""

import contextlib
import io
import logging
import os
import stat
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from imagen.reference.text_encoder import TextEncoder
from imagen.reference.unet import Unet
from imagen.runtime.contract import BATCH, StageSignature

TWO_GB = 2**31  # protobuf's limit on one serialized message: a larger .onnx must keep its weights outside
EXTERNAL_DATA_THRESHOLD = int(TWO_GB * 0.9)  # weight bytes above which a stage is written with external data
STACK_TRACE = "pkg.torch.onnx.stack_trace"  # node metadata naming the exporting machine's source paths


class ExportError(RuntimeError):
    """An export step failed; the message names the stage and what to do."""


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
        with _quiet(), torch.no_grad():
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


def external_data_files(path: Path) -> list[Path]:
    """Every file the model at `path` reads its tensors from, in first-use order; ExportError if one
    is missing or lies outside the model's folder (the runtime would refuse it)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    folder = path.parent.resolve()
    files = []
    for tensor in _tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = {entry.key: entry.value for entry in tensor.external_data}.get("location", "")
        file = path.parent / location
        if (
            not location
            or Path(location).is_absolute()
            or ".." in Path(location).parts
            or not file.resolve().is_relative_to(folder)
            or not file.is_file()
        ):
            raise ExportError(
                f"{path.name}: tensor {tensor.name} reads external data {location!r}, which is not a "
                f"file inside {path.parent}"
            )
        if file not in files:
            files.append(file)
    return files


def _tensors(model):
    """Every TensorProto of a model: initializers, sparse initializers and node attributes, in
    subgraphs and functions too."""
    graphs = [model.graph]
    nodes = [node for function in model.functions for node in function.node]
    while graphs or nodes:
        if graphs:
            graph = graphs.pop()
            yield from graph.initializer
            yield from _sparse(graph.sparse_initializer)
            nodes.extend(graph.node)
            continue
        for attribute in nodes.pop().attribute:
            yield from [attribute.t] if attribute.HasField("t") else []
            yield from attribute.tensors
            yield from _sparse([attribute.sparse_tensor] if attribute.HasField("sparse_tensor") else [])
            yield from _sparse(attribute.sparse_tensors)
            graphs.extend([attribute.g] if attribute.HasField("g") else [])
            graphs.extend(attribute.graphs)


def _sparse(tensors):
    for tensor in tensors:
        yield from (tensor.values, tensor.indices)


def convert_fp16(src: Path, dst: Path, external_data_threshold: int = EXTERNAL_DATA_THRESHOLD) -> list[Path]:
    """FP16 weights and math with FP32 inputs and outputs (casts at the graph edges); returns the
    files written, as `export_stage` does. `src` goes by path: the converter then infers shapes
    from the file (onnx's in-memory shape inference stops at 2 GB)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with _quiet():
        half = convert_float_to_float16(str(src), keep_io_types=True, disable_shape_infer=False)
    _sort_topologically(half.graph)  # the converter appends its input casts at the end
    _drop_redundant_casts(half.graph)  # it casts float32 Resize scales to float32 again: strict typing wants none
    del half.graph.value_info[:]  # it also leaves stale float32 annotations on FP16 tensors
    large = sum(t.ByteSize() for t in half.graph.initializer) > external_data_threshold
    # Without `location` onnx names the data file by a fresh UUID; name it as the exporter does.
    onnx.save(half, str(dst), save_as_external_data=large, location=f"{dst.name}.data")
    files = [dst] + external_data_files(dst)
    mode = stat.S_IMODE(dst.stat().st_mode)  # onnx may write the data through a 0600 temporary file:
    for file in files[1:]:  # give it the permissions the model file got from the umask
        os.chmod(file, mode)
    return files


def _drop_redundant_casts(graph) -> None:
    """Remove Casts to the type their input already has (float32 -> float32 on Resize scales,
    float16 -> float16), reading the consumers from the input. Types are those known without shape
    inference, which stops at 2 GB: initializers, graph inputs, Constants and earlier Casts."""
    import onnx

    types = {t.name: t.data_type for t in graph.initializer}
    types.update((i.name, i.type.tensor_type.elem_type) for i in graph.input)
    outputs, rename, kept = {o.name for o in graph.output}, {}, []
    for node in graph.node:
        node.input[:] = [rename.get(name, name) for name in node.input]
        attributes = {a.name: a for a in node.attribute}
        if node.op_type == "Constant" and "value" in attributes:
            types[node.output[0]] = attributes["value"].t.data_type
        if node.op_type == "Cast":
            to = onnx.helper.get_attribute_value(attributes["to"])
            if types.get(node.input[0]) == to and node.output[0] not in outputs:
                rename[node.output[0]] = node.input[0]
                continue
            types[node.output[0]] = to
        kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)


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


def measure_parity(
    module: nn.Module,
    signature: StageSignature,
    path: Path,
    batch_sizes=(1, 3),
    seed: int = 0,
    threads: int | None = None,
    **input_kwargs,
) -> list[float]:
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
            raise ExportError(
                f"{signature.name}: ONNX output shape {got.shape} != reference {expected.shape} at batch {batch}"
            )
        errors.append(relative_error(got, expected))
    return errors
