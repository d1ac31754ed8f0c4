"""Overwrite a CPU tensor without paying for its old pages.

``from_pretrained`` memory-maps safetensors files privately: until the first write, a weight's memory
*is* the file's page cache, and the first write into each 4 KiB page copies it (copy-on-write).  Once
those pages have been read -- by the dense evaluation, or by the calibration pass that just observed the
block -- every copy must also flush the old read-only mapping from each core that runs the process, and
the intra-op worker thread spinning on the other core makes that one interrupt per page.  On our 2-core
machine, writing the 210 pruned linears of SmolLM2-135M back that way took 1.38 s, about 4% of the
whole Wanda prune (``benchmarks/write_back.py``).

A tensor about to be overwritten *entirely* needs none of its old contents.  :func:`overwrite_` first
hands back the pages that lie wholly inside it (``madvise(MADV_DONTNEED)``: one batched unmapping), so
the write lands on fresh pages: the same writes took 0.16 s.  A page shared with a neighbouring tensor is
kept, and nothing is handed back unless the copy is certain to cover it (same shape, the source on the
CPU and outside the target's memory); anywhere else -- not Linux, a GPU tensor, a strided view -- the
write is a plain ``copy_``.
"""

from __future__ import annotations

import ctypes
import mmap
import sys

import torch

_madvise = None
if sys.platform.startswith("linux") and hasattr(mmap, "MADV_DONTNEED"):
    try:
        _madvise = ctypes.CDLL(None, use_errno=True).madvise
        _madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _madvise.restype = ctypes.c_int
    except (OSError, AttributeError):  # pragma: no cover - a libc without madvise
        _madvise = None


def byte_range(t: torch.Tensor) -> "tuple[int, int] | None":
    """``[start, end)`` addresses of ``t``'s elements when they fill that range exactly, else None.

    True for a contiguous tensor and for the transpose of one (GPT-2's ``Conv1D`` weight seen as
    ``(out, in)``); a tensor with gaps or repeats (a slice with a step, an expanded view) has no such range.
    """
    if t.numel() == 0:
        return None
    if not (t.is_contiguous() or (t.dim() == 2 and t.t().is_contiguous())):
        return None
    start = t.data_ptr()
    return start, start + t.numel() * t.element_size()


def whole_pages(start: int, end: int, page: int = mmap.PAGESIZE) -> "tuple[int, int] | None":
    """The largest page-aligned ``[a, b)`` inside ``[start, end)``, or None when no whole page fits."""
    a = -(-start // page) * page
    b = end // page * page
    return (a, b) if b > a else None


def discard_pages(t: torch.Tensor) -> bool:
    """Hand back the pages wholly inside ``t``; their contents are lost (zeros, or the mapped file's bytes).

    Only for a tensor that is overwritten right after.  Returns whether any page was handed back.
    """
    return t.device.type == "cpu" and _discard_span(byte_range(t))


def _discard_span(span: "tuple[int, int] | None") -> bool:
    """Hand back the whole pages inside the CPU address range ``span`` (see :func:`discard_pages`)."""
    if _madvise is None or span is None or (pages := whole_pages(*span)) is None:
        return False
    return _madvise(pages[0], pages[1] - pages[0], mmap.MADV_DONTNEED) == 0


def _overlaps(a: torch.Tensor, span: "tuple[int, int]") -> bool:
    storage = a.untyped_storage()
    lo = storage.data_ptr()
    return lo < span[1] and span[0] < lo + storage.nbytes()


@torch.no_grad()
def overwrite_(target: torch.Tensor, source: torch.Tensor) -> None:
    """``target.copy_(source)``, handing back ``target``'s old pages first when that is safe."""
    span = byte_range(target) if target.device.type == "cpu" else None
    if (span is not None and source.device.type == "cpu" and source.shape == target.shape
            and not _overlaps(source, span)):
        _discard_span(span)
    target.copy_(source)
