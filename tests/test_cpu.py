"""tune_cpu_allocator: glibc's malloc thresholds set at run time, in a child process (the setting is process-wide)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from hf_eenet import tune_cpu_allocator

CHILD = """
import ctypes, ctypes.util, sys
import hf_eenet
applied = hf_eenet.tune_cpu_allocator(mmap_threshold=16 * 2**20)
# read the setting back by its effect: a 1 MiB block is now below the mmap threshold, so freeing and allocating it
# again reuses its heap address (with glibc's defaults the first one is mmap'd and the second comes from the heap)
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
first = libc.malloc(2**20); libc.free(first); second = libc.malloc(2**20); libc.free(second)
print(applied, first == second)
"""


@pytest.mark.skipif(platform.system() != "Linux", reason="glibc's malloc")
def test_allocator_is_tuned_in_a_child_process():
    result = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["True", "True"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mmap_threshold": 64 * 2**20}, r"`mmap_threshold` must be a number of bytes in \[0, 33554432\]"),
        ({"mmap_threshold": -1}, "`mmap_threshold` must be"),
        ({"trim_threshold": 2**31}, r"`trim_threshold` must be a number of bytes in \[0, 2147483647\]"),
        ({"trim_threshold": 1.5}, "`trim_threshold` must be"),
    ],
)
def test_bad_thresholds_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tune_cpu_allocator(**kwargs)
