"""Sparsity accounting and the environment a result was measured in."""

from __future__ import annotations

import os
import platform
import resource
import sys

import torch

from .. import allocator


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports kilobytes, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def parameter_counts(model) -> dict[str, int]:
    """Zeros and totals over every parameter of the model (embeddings and head included)."""
    total = zeros = 0
    for p in model.parameters():
        total += p.numel()
        zeros += p.numel() - int(torch.count_nonzero(p))
    return {"total_params": total, "zero_params": zeros, "nonzero_params": total - zeros}


def parameter_counts_in(folder) -> dict[str, int]:
    """:func:`parameter_counts` of a saved model, read tensor by tensor from its safetensors files."""
    from ..models.stream import Checkpoint

    checkpoint = Checkpoint(folder)
    total = zeros = 0
    for name in checkpoint.file_of:
        if checkpoint.dtype[name].is_floating_point:
            for chunk in checkpoint.chunks(name):  # never a whole embedding matrix in memory
                total += chunk.numel()
                zeros += chunk.numel() - int(torch.count_nonzero(chunk))
    return {"total_params": total, "zero_params": zeros, "nonzero_params": total - zeros}


def library_versions() -> dict[str, str]:
    import transformers

    from .. import __version__

    return {"secateurs": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def machine() -> dict[str, object]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "allocator": allocator.describe()}
