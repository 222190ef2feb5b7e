"""CPU settings that early-exit inference on small feature maps depends on."""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

__all__ = ["tune_cpu_allocator"]

# glibc's `mallopt` parameters (malloc.h) and the largest mmap threshold it accepts on 64-bit systems
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MAX_MMAP_THRESHOLD = 32 * 2**20


def tune_cpu_allocator(mmap_threshold: int = _MAX_MMAP_THRESHOLD, trim_threshold: int = 2**30) -> bool:
    r"""
    Keep the memory of large CPU tensors in the process between allocations (glibc's malloc), instead of returning
    it to the operating system on every free and faulting it back in page by page on the next allocation.

    glibc serves an allocation above its mmap threshold (128 KiB at first) with fresh pages and unmaps them when the
    block is freed, and it returns free memory at the top of the heap beyond its trim threshold. A forward pass whose
    activations are a few MiB each then spends much of its time in page faults: on 2 cores here, a 3x3 convolution from
    3 to 16 channels on a batch of 64 CIFAR images took 2.3-3.1 ms with the defaults and 0.31-0.36 ms with these
    settings, and the stages of a CIFAR ResNet that run on 32x32 maps, which early exits serve, were slowed the most
    (see `benchmarks/results/cpu_allocator.md`). This is what the `MALLOC_MMAP_THRESHOLD_` and
    `MALLOC_TRIM_THRESHOLD_` environment variables (or an allocator such as jemalloc or tcmalloc, as PyTorch's CPU
    performance guide suggests) do, set from Python at run time with `mallopt`.

    The setting is process-wide and the package never applies it on import; hf_eenet's scripts call it at start. The
    price is memory: up to `trim_threshold` bytes freed at the top of the heap stay reserved by the process.

    Args:
        mmap_threshold (`int`, *optional*, defaults to 32 MiB):
            Allocations below this size come from the heap, whose freed memory is reused (at most 32 MiB, glibc's
            limit on 64-bit systems).
        trim_threshold (`int`, *optional*, defaults to 1 GiB):
            Free memory at the top of the heap kept before any is returned to the system (at most 2**31 - 1).

    Returns:
        `bool`: whether the settings were applied (`False` where the C library is not glibc: macOS, Windows, musl).
    """
    for name, value, high in (
        ("mmap_threshold", mmap_threshold, _MAX_MMAP_THRESHOLD),
        ("trim_threshold", trim_threshold, 2**31 - 1),  # a C int
    ):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= high:
            raise ValueError(f"`{name}` must be a number of bytes in [0, {high}], got {value!r}.")
    if platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    if not (hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt")):  # glibc only
        return False
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))
