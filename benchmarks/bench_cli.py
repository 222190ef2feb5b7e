"""Command-line helpers the benchmarks share: argument types that refuse bad counts, and child processes whose
failures show their own error."""

from __future__ import annotations

import argparse
import subprocess


def positive_int(text: str) -> int:
    """An `argparse` type: a whole number >= 1 (a count of repeats, samples, processes, threads, or a batch size)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {value}")
    return value


def run_child(command: list[str], what: str) -> str:
    """Run a benchmark's child process; its standard output, or an error that carries the child's own."""
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed (exit status {done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout
