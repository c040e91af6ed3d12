"""Benchmarks: two suites whose ratios are measured side by side in one run, and the tools beside them.

    python -m bench            # the CPU suite (bench/cpu/), sections 1 to 5: ONNX Runtime on the CPU
    python -m bench.gpu        # the GPU suite (bench/gpu/), sections 6 to 9: one NVIDIA GPU, or a smoke run
    python -m bench.cpu.presets       # MinImagen's Base and Super presets exported and run (CPU)
    python -m bench.serve_load --url http://127.0.0.1:8000   # a bounded load on an imagen-serve of this machine

Shared by both suites: `machine` (what the numbers were measured on), `prompts` (the requests they
send) and `markdown` (numbers and tables in the reports). The suites' section numbers do not
overlap, so a section number names one measurement.
"""
