"""ONNX external data: the threshold above which a stage keeps its weights outside its `.onnx`
file, and the walk that finds every file a written model reads its tensors from."""

from pathlib import Path

from .errors import ExportError

TWO_GB = 2**31  # protobuf's limit on one serialized message: a larger .onnx must keep its weights outside
EXTERNAL_DATA_THRESHOLD = int(TWO_GB * 0.9)  # weight bytes above which a stage is written with external data


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
