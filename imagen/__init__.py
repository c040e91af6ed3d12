"""An Imagen-style text-to-image cascade: `imagen.reference` (PyTorch), `imagen.export` (ONNX,
TensorRT) and `imagen.runtime` (NumPy over engines)."""

__version__ = "0.1.0"
