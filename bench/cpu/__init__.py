"""The CPU suite: the cascade's performance targets on ONNX Runtime (CPU), measured side by side in
one run.

    python -m bench                                   # the demo bundle, every section (also python -m bench.cpu)
    python -m bench --run runs/demo --bundle runtime/demo --out docs/benchmarks.md
    python -m bench --quick --sections 2,5            # tiny sizes and counts (a smoke run)

Sections, one module each, each a function returning a dict:

1. `reference_vs_runtime`: PyTorch eager reference vs the runtime, same sampler, steps,
   batch and noise: wall time per image and the ratio (target: runtime >= 2.0x faster).
2. `engine_efficiency`: this machine's GEMM rate (NumPy and an ONNX Runtime MatMul), each
   Unet engine's achieved FLOP rate at batch 2 (cond + uncond) as a share of it (target:
   >= 75% for a 64x64 dim-64 base Unet), and ONNX Runtime session options compared on
   that Unet.
3. `outside_engine`: time outside engine calls (tokenizer, NumPy loop, resize, PNG) as a
   share of a request (target: <= 3%).
4. `steps_vs_quality`: `imagen-eval`'s exact-match rate (with its 95% interval, n captions at
   two seeds) and images/second of every sampler at equal Unet calls (target: the best sampler
   at 25 steps within 1 point of ancestral DDPM over every timestep).
5. `memory`: peak resident memory and cold start (import + load) of the runtime, each in
   a fresh process (targets: <= 400 MB, <= 1.5 s).

Around them: `timing` (timers, GEMM probes, ONNX Runtime sessions), `workload` (every call
the sections make into the runtime), `suite` (runs the chosen sections), `report` (the
Markdown) and `__main__` (the command line); `bench.machine` and `bench.prompts` are shared
with the GPU suite. With `--out FILE` the report replaces the part of FILE between
`<!-- bench:start -->` and `<!-- bench:end -->` (or is appended, with the markers, when FILE
has none), so hand-written text around it stays.

Apart from the suite, `python -m bench.cpu.sampler_study` asks why a sampler loses adherence: it
changes one factor at a time (thresholding, guidance, spacing, one stage's sampler), swapping a
runtime function in for the factors that are not request settings. `python -m bench.cpu.precision`
compares the CPU engines and precisions (docs/cpu-backends.md); `python -m bench.cpu.deepfloyd` and
`python -m bench.cpu.imagen_pytorch` time the runtime against diffusers' and imagen-pytorch's own
sampling on their tiny cascades.

The sections use only the runtime's public API: `Pipeline.load`, `Pipeline.settings`,
`Pipeline.bundle`, a request's `info[i]["timings"]`, and `imagen.runtime.bundle.load_bundle`.
"""
