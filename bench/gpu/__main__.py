"""`python -m bench.gpu`: the GPU suite (see bench/gpu/__init__.py)."""

from .suite import main

if __name__ == "__main__":
    main()
