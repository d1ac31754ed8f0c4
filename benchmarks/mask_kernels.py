"""Mask selection on the built-in model's weights: the product's kernels against the ones they replaced.

    python benchmarks/mask_kernels.py           # 6 runs, ~1 min on 2 CPU cores

Each run is a fresh process that loads SmolLM2-135M (fp32, 2 threads) and builds the prune mask of all 210
linear weights of its 30 blocks from their magnitudes, 5 times; the row reports the best of the 5 totals.

* N:M -- ``pairwise`` is the product's :func:`secateurs.patterns.nm_mask` (each weight counts how many of its
  group go before it); ``sort`` is a stable ``argsort`` of every group and a scatter of its first M - N
  indices, the previous implementation.
* unstructured 50% per output row -- ``partition`` is the product's
  :func:`secateurs.patterns.unstructured_mask`, whose k-th value per row comes from NumPy's introselect;
  ``kthvalue`` is the same function with ``torch.kthvalue`` in its place, the previous implementation.

Both masks are compared element by element in every run.
Results go to ``benchmarks/results/mask_kernels.{json,md}``.
"""

from __future__ import annotations

import sys
import time

from common import benchmark_main, measured_on

RUNS = [f"{nm}/{kernel}" for nm in ("2:4", "4:8") for kernel in ("sort", "pairwise")]
RUNS += ["unstructured/kthvalue", "unstructured/partition"]
REPEATS = 5


def sort_mask(scores, n: int, m: int):
    import torch

    rows, cols = scores.shape
    groups = scores.reshape(rows, cols // m, m)
    order = torch.argsort(groups, dim=-1, stable=True)[..., : m - n]
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, order, True).reshape(rows, cols)


def kthvalue_mask(scores):
    """The product's per-row 50% mask with ``torch.kthvalue`` choosing the threshold, as before."""
    import torch

    from secateurs import patterns

    product = patterns.kth_smallest
    patterns.kth_smallest = lambda s, k: torch.kthvalue(s, k, dim=1, keepdim=True).values
    try:
        return patterns.unstructured_mask(scores, 0.5)
    finally:
        patterns.kth_smallest = product


def one(run: str) -> dict:
    import torch

    from secateurs import load_model
    from secateurs.api import environment
    from secateurs.models import find_blocks, find_linears, weight_of
    from secateurs.patterns import nm_mask, unstructured_mask

    torch.set_num_threads(2)
    setting, kernel = run.split("/")
    if setting == "unstructured":
        kernels = {"partition": lambda s: unstructured_mask(s, 0.5), "kthvalue": kthvalue_mask}
    else:
        n, m = (int(v) for v in setting.split(":"))
        kernels = {"pairwise": lambda s: nm_mask(s, n, m), "sort": lambda s: sort_mask(s, n, m)}
    build = kernels.pop(kernel)
    (other,) = kernels.values()  # the kernel it is compared with
    model, _ = load_model("smollm2-135m")
    _, blocks = find_blocks(model)
    scores = [weight_of(lin).abs() for block in blocks for lin in find_linears(block).values()]
    best = float("inf")
    for _ in range(REPEATS):
        t = time.perf_counter()
        masks = [build(s) for s in scores]
        best = min(best, time.perf_counter() - t)
    same = all(torch.equal(mask, other(s)) for mask, s in zip(masks, scores))
    return {"run": run, "pattern": setting, "kernel": kernel, "matrices": len(scores),
            "weights": sum(s.numel() for s in scores), "seconds": round(best, 3), "same_mask": same,
            **environment()}


def markdown(rows: list[dict], command: str) -> str:
    lines = ["# Mask selection: the product's kernels against the ones they replaced", "", measured_on(rows[0]), "",
             "N:M: `pairwise` (each weight counts how many of its group go before it) against a stable sort of "
             "every group. Unstructured 50% per output row: the k-th value per row by NumPy's introselect "
             "(`partition`) against `torch.kthvalue`, the same tie pass after both. "
             f"The prune masks of all {rows[0]['matrices']} linear weights in SmolLM2-135M's 30 blocks "
             f"({rows[0]['weights'] / 1e6:.1f} M weights), scored by magnitude; best of {REPEATS} totals, one fresh "
             "process per row. `same mask` = the two kernels chose exactly the same weights in every matrix.", "",
             f"Reproduce: `{command}`", "",
             "| pattern | kernel | seconds per model | same mask |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['pattern']} | {r['kernel']} | {r['seconds']:.3f} | {'yes' if r['same_mask'] else 'NO'} |")
    return "\n".join(lines + [""])


if __name__ == "__main__":
    sys.exit(benchmark_main(__file__, __doc__, RUNS, "mask_kernels", one, markdown,
                            lambda r: f"{r['run']:>12}: {r['seconds']:.3f} s, same mask {r['same_mask']}"))
