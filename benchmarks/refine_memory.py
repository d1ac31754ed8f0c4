"""Working memory of ADMM weight reconstruction (``refine="admm"``) on layer shapes of a 7B Llama.

    python benchmarks/refine_memory.py          # 4 runs, ~3 min on 2 CPU cores

Each run is a fresh process that builds one stacked weight group in float32 -- the dense weights ``W0``, the
method's result ``W``, the mask and ``H = X^T X`` from 2048 random tokens -- and then calls
:func:`secateurs.methods.reconstruct.admm_reconstruct` for 2 iterations (memory does not grow with
iterations), once solving all rows together (``chunk_rows`` = every row) and once 4096 rows at a time (the
default).  A thread samples the resident set every 5 ms; ``extra`` is its peak during the call minus the
resident set just before it, i.e. what reconstruction adds on top of what the engine already holds.
Results go to ``benchmarks/results/refine_memory.{json,md}``.
"""

from __future__ import annotations

import sys
import time

from common import PeakRSS, benchmark_main, measured_on

SHAPES = {"gate+up (7B)": (2 * 11008, 4096), "q+k+v (7B)": (3 * 4096, 4096)}
RUNS = [f"{name}/{chunk}" for name in SHAPES for chunk in ("all", "4096")]
MIB = 2**20


def one(run: str) -> dict:
    import torch

    from secateurs.api import environment
    from secateurs.methods.reconstruct import admm_reconstruct

    torch.set_num_threads(2)
    name, chunk = run.split("/")
    rows, cols = SHAPES[name]
    chunk_rows = rows if chunk == "all" else int(chunk)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(2048, cols, generator=g)
    H = X.t() @ X
    del X
    W0 = torch.randn(rows, cols, generator=g)
    keep = torch.rand(rows, cols, generator=g) > 0.5
    W = W0 * keep
    with PeakRSS() as rss:
        t = time.perf_counter()
        out = admm_reconstruct(W, W0, H, keep, iters=2, chunk_rows=chunk_rows)
        seconds = time.perf_counter() - t
    return {"run": run, "shape": name, "rows": rows, "cols": cols, "chunk_rows": chunk_rows,
            "weight_mib": round(rows * cols * 4 / MIB, 1), "before_mib": round(rss.before / MIB, 1),
            "extra_mib": round((rss.peak - rss.before) / MIB, 1), "seconds": round(seconds, 2),
            "zeros_ok": bool((out[~keep] == 0).all()), **environment()}


def markdown(rows: list[dict], command: str) -> str:
    lines = ["# ADMM reconstruction: working memory on 7B-sized layer groups", "", measured_on(rows[0]), "",
             "float32; one stacked group per fresh process, 2 ADMM iterations. `extra` = peak resident set during "
             "`admm_reconstruct` minus the resident set just before it (which already holds W0, W, the mask and H). "
             "The result itself (one weight's size) is part of `extra`.", "",
             f"Reproduce: `{command}`", "",
             "| group | shape | rows per chunk | one weight MiB | extra MiB | extra / weight | seconds (2 iterations) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['rows']} x {r['cols']} | {r['chunk_rows']} | {r['weight_mib']:.0f} | "
                     f"{r['extra_mib']:.0f} | {r['extra_mib'] / r['weight_mib']:.2f} | {r['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    return benchmark_main(__file__, __doc__, RUNS, "refine_memory", one, markdown,
                          lambda r: f"{r['run']}: extra {r['extra_mib']:.0f} MiB over {r['before_mib']:.0f} MiB, "
                                    f"{r['seconds']:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
