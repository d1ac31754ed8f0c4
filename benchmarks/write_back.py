"""Writing pruned weights back into a memory-mapped model: a plain ``copy_`` against ``overwrite_``.

    python benchmarks/write_back.py             # 2 runs, ~1 min on 2 CPU cores

Each run is a fresh process that, REPEATS times, loads SmolLM2-135M (``from_pretrained`` memory-maps the cached
safetensors file), runs one forward over 8 x 512 random token ids (which maps every weight's pages, as the dense
evaluation and the observing pass do), then for each of the 210 linears of the 30 blocks in turn builds
its 50% magnitude-pruned weight (two-thread tensor work, like the pruning math) and writes it into the model;
only the writes are timed.  ``copy`` is ``weight.copy_(pruned)`` (the engine before); ``overwrite`` is
:func:`secateurs.models.pages.overwrite_`, which hands the weight's old pages back to the kernel first (the
engine now).  Then it times one matrix product through every written weight (does the new memory cost
anything later?), reads the process's resident memory, and checks every weight holds exactly what was written.
Results go to ``benchmarks/results/write_back.{json,md}``.
"""

from __future__ import annotations

import statistics
import sys
import time

from common import BATCH, CALIB_SEQLEN, benchmark_main, page_head

RUNS = ["copy", "overwrite"]
REPEATS = 3


def resident_mib() -> dict:
    """``VmRSS``, ``RssAnon`` and ``RssFile`` of this process (MiB, Linux)."""
    with open("/proc/self/status") as f:
        return {k: int(v.split()[0]) // 1024 for k, v in (line.split(":", 1) for line in f)
                if k in ("VmRSS", "RssAnon", "RssFile")}


def one(run: str) -> dict:
    import torch

    from secateurs import load_model
    from secateurs.api import environment
    from secateurs.models import find_blocks, find_linears, weight_of
    from secateurs.models.pages import overwrite_
    from secateurs.patterns import unstructured_mask

    torch.set_num_threads(2)
    writers = {"copy": lambda target, source: target.copy_(source), "overwrite": overwrite_}
    if run not in writers:
        raise SystemExit(f"write_back.py: unknown run {run!r}; the runs are {', '.join(RUNS)}")
    write = writers[run]
    repeats = []
    for _ in range(REPEATS):
        model, _ = load_model("smollm2-135m")
        with torch.no_grad():
            model(torch.randint(0, 1000, (BATCH, CALIB_SEQLEN), generator=torch.Generator().manual_seed(0)),
                  use_cache=False)
        _, blocks = find_blocks(model)
        weights = [weight_of(lin) for block in blocks for lin in find_linears(block).values()]
        matrices = len(weights)
        written, seconds = [], 0.0
        for W in weights:
            pruned = W.masked_fill(unstructured_mask(W.abs(), 0.5), 0)
            t = time.perf_counter()
            write(W, pruned)
            seconds += time.perf_counter() - t
            written.append(pruned)
        x = {n: torch.randn(4 * CALIB_SEQLEN, n) for n in {W.shape[1] for W in weights}}
        t = time.perf_counter()
        for W in weights:
            x[W.shape[1]] @ W.t()
        use = time.perf_counter() - t
        exact = all(torch.equal(W, p) for W, p in zip(weights, written))
        repeats.append({"write_seconds": round(seconds, 3), "use_seconds": round(use, 3), "exact": exact,
                        "rss_mib": resident_mib()})
        del model, weights, written
    return {"run": run, "matrices": matrices, "repeats": repeats,
            "median_write_seconds": statistics.median(r["write_seconds"] for r in repeats), **environment()}


def markdown(rows: list[dict], command: str) -> str:
    lines = page_head("Writing pruned weights back into a memory-mapped model (SmolLM2-135M)", rows[0],
                      f"Each run: {REPEATS} times in one process, a freshly loaded (memory-mapped) model, one forward "
                      "over 8 x 512 tokens, then the 50% magnitude-pruned weight of each of the 210 block linears is "
                      "built and written back; `write s` sums the writes alone. `use s`: one matrix product (2048 "
                      "rows) through every written weight. `exact`: every weight holds what was written. RSS is read "
                      "after the product (last repeat).", command)
    lines += ["| write | write s (each) | median | use s (each) | exact | RSS / anon / file MiB |", "|---|---|---|---|---|---|"]
    for r in rows:
        rss = r["repeats"][-1]["rss_mib"]
        lines.append(f"| {r['run']} | {', '.join(format(x['write_seconds'], '.3f') for x in r['repeats'])} | "
                     f"**{r['median_write_seconds']:.3f}** | "
                     f"{', '.join(format(x['use_seconds'], '.2f') for x in r['repeats'])} | "
                     f"{all(x['exact'] for x in r['repeats'])} | "
                     f"{rss.get('VmRSS')} / {rss.get('RssAnon')} / {rss.get('RssFile')} |")
    return "\n".join(lines + [""])


def describe(row: dict) -> str:
    return f"{row['run']:>10}: write {', '.join(str(x['write_seconds']) for x in row['repeats'])} s"


def main() -> int:
    return benchmark_main(__file__, __doc__, RUNS, "write_back", one, markdown, describe)


if __name__ == "__main__":
    sys.exit(main())
