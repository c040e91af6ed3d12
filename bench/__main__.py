"""`python -m bench`: the CPU suite (bench/cpu); `python -m bench.gpu` runs the GPU suite."""

from bench.cpu.__main__ import main

if __name__ == "__main__":
    main()
