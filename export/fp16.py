"""FP16 conversion of an exported FP32 stage: onnxruntime's converter with FP32 inputs and
outputs, then the graph surgery that strongly typed engines need (topological order, no Cast to
the type a tensor already has, no stale float32 annotations)."""

import os
import stat
from pathlib import Path

from .errors import ExportError
from .external_data import EXTERNAL_DATA_THRESHOLD, external_data_files
from .onnx_export import quiet


def convert_fp16(src: Path, dst: Path, external_data_threshold: int = EXTERNAL_DATA_THRESHOLD) -> list[Path]:
    """FP16 weights and math with FP32 inputs and outputs (casts at the graph edges); returns the
    files written, as `export_stage` does. `src` goes by path: the converter then infers shapes
    from the file (onnx's in-memory shape inference stops at 2 GB)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with quiet():
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
