"""The first line every benchmark prints: when and on what it ran (RESULTS.md records both with
each figure, since this machine's speed changes from one week to the next)."""

from __future__ import annotations

import datetime
import os
import platform

import torch

__all__ = ["header"]


def _cpu() -> str:
    # platform.processor() is empty on most Linux systems; /proc/cpuinfo names the model
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def header(extra: str = "") -> str:
    """``# <date time>, <cpu>, <cores> cores, torch <version>, <threads> threads, GPU: <name or no>``,
    then ``; extra`` if given."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no"
    line = (f"# {datetime.datetime.now():%Y-%m-%d %H:%M}, {_cpu()} ({platform.machine()}), {os.cpu_count()} "
            f"cores, torch {torch.__version__}, {torch.get_num_threads()} threads, GPU: {gpu}")
    return f"{line}; {extra}" if extra else line
