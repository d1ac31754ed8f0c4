"""Keep freed CPU memory for the next tensors instead of handing it back to the kernel after each one.

On Linux, PyTorch's CPU tensors come from glibc's ``malloc``.  glibc serves every request above its *mmap
threshold* with fresh pages mapped from the kernel and unmaps them on ``free``; the threshold starts at
128 KiB and rises to the size of such a block when one is freed, up to 32 MiB.  It also gives the free top
of its heap back to the kernel once that exceeds the *trim threshold* (twice the mmap threshold).  A decoder
block's activations are a few MiB to a few tens of MiB each, made and dropped for every batch, so with the
defaults much of that memory goes back to the kernel and returns as new pages: every 4 KiB page touched is a
page fault, and the kernel zeroes it.  Pruning the built-in model with Wanda (32 x 512 calibration tokens)
took ~4 million such faults and ~6 s of kernel time, in a 27 s prune.

:func:`reuse_freed_memory` fixes both thresholds (``mallopt``): blocks up to 32 MiB, glibc's largest
allowed, come from the heap, and up to 1 GiB of its free top is kept for the next ones.  Larger blocks (a
batch's logits) are still mapped and unmapped, so what is kept stays bounded.  The command line turns it on
for its own process; a library should not change its host's allocator on import, so a script calls it
itself.  ``SECATEURS_ALLOCATOR=system`` leaves glibc's defaults alone.
"""

from __future__ import annotations

import ctypes
import os
import platform

from .errors import ConfigError

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 1 << 30

_in_effect: "bool | None" = None  # None: not asked yet


def reuse_freed_memory() -> bool:
    """Set glibc's thresholds as the module docstring says, once per process.

    Returns whether the setting is in effect: False off Linux's glibc (musl, macOS, Windows), when
    ``mallopt`` refuses, or with ``SECATEURS_ALLOCATOR=system``.  Any other value of that variable is a
    ``ValueError``, rather than a setting silently ignored.
    """
    global _in_effect
    if _in_effect is None:
        _in_effect = _apply()
    return _in_effect


def on_glibc() -> bool:
    """Whether this process runs on Linux's glibc, whose ``mallopt`` this module sets."""
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def _apply() -> bool:
    choice = os.environ.get("SECATEURS_ALLOCATOR", "")
    if choice.strip().lower() == "system":
        return False
    if choice.strip():
        raise ConfigError(f"SECATEURS_ALLOCATOR={choice!r}: the only value is 'system' (glibc's default thresholds); "
                         "unset it to reuse freed memory")
    if not on_glibc():
        return False
    try:  # the C library this process already runs on (as models/pages.py finds madvise); no search for it
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    # mallopt returns 1 on success; setting either one stops glibc adjusting the thresholds itself
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1


def give_back_freed_memory() -> None:
    """Hand the freed heap back to the kernel now (glibc's ``malloc_trim``), when :func:`reuse_freed_memory`
    keeps it.  A streamed walk calls it between blocks: within a block freed activations are reused, but a
    finished block's memory must not stay in the process, or the peak grows with the model's depth."""
    if _in_effect:
        ctypes.CDLL(None).malloc_trim(0)


def describe() -> str:
    """What this process's allocator does, for reports and benchmark pages."""
    if _in_effect:
        return (f"glibc, freed memory reused (mmap threshold {MMAP_THRESHOLD >> 20} MiB, "
                f"trim threshold {TRIM_THRESHOLD >> 30} GiB)")
    return "system default"
