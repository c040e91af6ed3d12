"""The machine the engines run on: its CPU's instruction-set flags, whether it does bf16 natively,
a key that names it, and the per-user cache folder where what is measured or compiled for a
machine and a bundle is kept.

The cache folder is `$IMAGEN_CACHE_DIR`, else `$XDG_CACHE_HOME/imagen`, else `~/.cache/imagen`
(the XDG base directory rule), never inside a bundle, which may be read-only or shared between
machines. Everything in it is rebuilt when it is missing or unreadable, so it can be deleted at
any time.
"""

import functools
import hashlib
import os
import platform
from pathlib import Path

CACHE_VARIABLE = "IMAGEN_CACHE_DIR"
# CPU flags (Linux /proc/cpuinfo names) with native bf16 arithmetic: AVX-512 BF16 (dot products of
# bf16 pairs into float32) or AMX's bf16 tiles. AVX-512F alone only converts, which is slower than fp32.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# the flags that choose the engines' kernels, in the machine key and in benchmark reports
KERNEL_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16")
KERNEL_FLAGS += ("asimd", "sve", "bf16")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's flags from /proc/cpuinfo (`flags` on x86, `Features` on Arm); empty where there is
    no such file (macOS, Windows)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what the platform says."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def native_bf16(flags=None, capabilities=()) -> bool:
    """Whether the CPU computes in bf16 natively: one of NATIVE_BF16_FLAGS among `flags` (None: this
    CPU's). Where the system lists no flags, OpenVINO's word for it: "BF16" among `capabilities`
    (its CPU device's OPTIMIZATION_CAPABILITIES, which the caller asks for)."""
    flags = cpu_flags() if flags is None else frozenset(flags)
    if flags:
        return any(flag in flags for flag in NATIVE_BF16_FLAGS)
    return "BF16" in capabilities


def logical_cpus() -> int:
    """The CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def machine_key(flags=None) -> str:
    """`<arch>-<12 hex digits>`: the architecture, and a hash of the CPU model, its kernel flags and
    the CPUs this process may use. Two machines with one key run the engines alike."""
    flags = cpu_flags() if flags is None else frozenset(flags)
    kernel = sorted(flags.intersection(KERNEL_FLAGS))
    text = f"{cpu_model()}|{'+'.join(kernel)}|{logical_cpus()}"
    return f"{platform.machine() or 'unknown'}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def cache_root() -> Path:
    """The per-user cache folder (see the module docstring); not created here."""
    chosen = os.environ.get(CACHE_VARIABLE)
    if chosen:
        return Path(chosen).expanduser()
    home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(home).expanduser() / "imagen"


def cache_folder(*parts: str) -> Path | None:
    """`cache_root()/parts...`, created, or None where it cannot be made or written (a read-only home):
    callers then measure or compile again each time instead of failing."""
    folder = cache_root().joinpath(*parts)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return folder if os.access(folder, os.W_OK | os.X_OK) else None
