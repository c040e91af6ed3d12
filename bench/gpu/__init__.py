"""`python -m bench.gpu`: the cascade on one NVIDIA GPU, in one call of a few minutes, with models it
makes itself (random weights; nothing is downloaded).

    python -m bench.gpu --json gpu.json            # on a GPU machine: about 5 minutes (--budget-s 420)
    python -m bench.gpu --smoke                     # tiny sizes; without CUDA this is what runs anyway
    python -m bench.gpu --run RUN --bundle BUNDLE   # a run and the bundle exported from it, instead of the scaffold

Sections, numbered after the CPU suite's (`python -m bench`, 1 to 5):

6. The environment: date, GPU, compute capability, driver and CUDA versions, torch, CuPy,
   onnxruntime and its providers, tensorrt and tensorrt_lean (env.py).
7. The PyTorch reference on CUDA: eager FP32, FP16 autocast, torch.compile (compile time apart), per
   image and per Unet call (reference.py).
8. The runtime's sampling loop in CuPy against NumPy, the reference Unet as engine: parity and the
   time outside engine calls (target: <= 3% of a request on the GPU) (loop.py).
9. TensorRT FP16 and ONNX Runtime's CUDA provider on the same Unet, or why not (engines.py).

Without CUDA it is a smoke run (tiny sizes, NumPy loop against ONNX Runtime, a reason for every GPU
row). torch.compile and the engines run in child processes stopped when the budget runs out; the
bench reads GPU settings and never changes them. Markdown goes to stdout, progress to stderr,
and `--json FILE` is rewritten after every section, so a run stopped from outside keeps its part.
`suite` runs the sections, `cascade` makes the models, `report` writes the Markdown.
"""
