"""reuse_freed_memory: freed activations are reused instead of page-faulted back in from the kernel."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from secateurs import allocator

on_glibc = pytest.mark.skipif(not allocator.on_glibc(), reason="mallopt is glibc's")

# In a fresh process: where a 25 MiB tensor (a block's activation) comes from, and what is left after it is
# dropped, from glibc's own accounting (mallinfo2: bytes in mapped blocks, free bytes held in the heap).
WHERE = """
import ctypes, json, torch
from secateurs import reuse_freed_memory

class Info(ctypes.Structure):
    _fields_ = [(f, ctypes.c_size_t) for f in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]

mallinfo2 = ctypes.CDLL(None).mallinfo2
mallinfo2.restype = Info
on = reuse_freed_memory()
before = mallinfo2().hblkhd
x = torch.ones(25 << 18)
mapped = mallinfo2().hblkhd - before
del x
kept = mallinfo2().fordblks
from secateurs.allocator import give_back_freed_memory
import os
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
held = rss()
give_back_freed_memory()
print(json.dumps({"in_effect": on, "mapped": mapped, "kept": kept, "given_back": held - rss()}))
"""


def where(**env) -> dict:
    out = subprocess.run([sys.executable, "-c", WHERE], capture_output=True, text=True, check=True,
                         env={**os.environ, **env})
    return json.loads(out.stdout.strip().splitlines()[-1])


@on_glibc
def test_activations_come_from_the_heap_and_stay_there():
    mib = 2**20
    default = where(SECATEURS_ALLOCATOR="system")
    assert default["in_effect"] is False
    assert default["mapped"] >= 25 * mib  # glibc's defaults map it from the kernel, and unmap it on free
    reused = where(SECATEURS_ALLOCATOR="")
    assert reused["in_effect"] is True
    assert reused["mapped"] < mib  # from the heap ...
    assert reused["kept"] >= 25 * mib  # ... which keeps it, freed, for the next batch
    assert reused["given_back"] >= 20 * mib  # until a streamed walk hands its pages back between blocks


def test_system_leaves_the_allocator_alone(monkeypatch):
    monkeypatch.setenv("SECATEURS_ALLOCATOR", "System")
    monkeypatch.setattr(allocator, "_in_effect", None)
    assert allocator.reuse_freed_memory() is False
    assert allocator.describe() == "system default"


def test_asked_once_per_process(monkeypatch):
    calls = []
    monkeypatch.setattr(allocator, "_in_effect", None)
    monkeypatch.setattr(allocator, "_apply", lambda: calls.append(1) or True)
    assert allocator.reuse_freed_memory() and allocator.reuse_freed_memory()
    assert calls == [1]
    assert allocator.describe().startswith("glibc, freed memory reused (mmap threshold 32 MiB")


def test_the_command_line_turns_it_on(monkeypatch):
    from secateurs.cli import main

    calls = []
    monkeypatch.setattr(allocator, "reuse_freed_memory", lambda: calls.append(1) or True)
    assert main(["prune", "--method", "magnitude", "--sparsity", "1.5", "--output", "unused"]) == 2
    assert calls == [1]


def test_an_unknown_setting_is_refused_in_one_line(monkeypatch, tmp_path, capsys):
    from secateurs.cli import main

    monkeypatch.setenv("SECATEURS_ALLOCATOR", "jemalloc")
    monkeypatch.setattr(allocator, "_in_effect", None)
    with pytest.raises(ValueError, match="SECATEURS_ALLOCATOR='jemalloc': the only value is 'system'"):
        allocator.reuse_freed_memory()
    out = tmp_path / "out"
    assert main(["prune", "--method", "magnitude", "--sparsity", "0.5", "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["secateurs: error: SECATEURS_ALLOCATOR='jemalloc': the only value is 'system' (glibc's default "
                   "thresholds); unset it to reuse freed memory"]
    assert not out.exists()
