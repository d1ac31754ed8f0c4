"""Prune time against one dense forward, repeated: the ratio's spread on a shared machine.

    python benchmarks/prune_speed.py                  # Wanda and SparseGPT at 50%, 2:4 and 4:8, ~21-27 min on 2 cores
    python benchmarks/prune_speed.py --runs wanda:0.5

quick_protocol.py measures each method's ratio once, next to its perplexity.  On a shared virtual machine one
measurement can be off by a third (the machine slows down for a minute), so here every run measures it
REPEATS times in one fresh process, each time on a freshly loaded model: time one plain dense forward over the
quick protocol's calibration tokens (32 x 512, batch 8, logits included), prune, time the dense forward again;
ratio = prune seconds / the mean of the two forwards.  The page shows every repeat and the median.

It also splits each prune by the pipeline stages the engine records (``PruneResult.stage_seconds``): the
walk (``calibrating``: capturing the first block's inputs and every pass of calibration data through the
blocks, with the statistics it gathers) and ``pruning`` (scoring, choosing the masks, updating, checking and
writing the weights).  The walk alone, over the same dense forward, is the floor the method's own work sits
on.  And it times the decoder blocks inside the first dense forward (from the first block's input to the
last block's output): the rest of that forward is the embeddings, the final norm and the LM head, which
pruning never runs.
"""

from __future__ import annotations

import statistics
import sys

from common import (REFERENCE_RATIO, TARGET_RATIO, benchmark_main, dense_forward_seconds, page_head,
                    protocol_config)

RUNS = ["wanda:0.5", "wanda:2:4", "wanda:4:8", "sparsegpt:0.5", "sparsegpt:2:4", "sparsegpt:4:8"]
REPEATS = 3


def blocks_seconds(model, calib) -> tuple[float, float]:
    """One dense forward (as :func:`dense_forward_seconds`) and the part of it spent inside the decoder blocks."""
    import time

    from secateurs.models.arch import find_blocks

    _, blocks = find_blocks(model)
    inside, since = [0.0], [0.0]

    def enter(module, args):
        since[0] = time.perf_counter()

    def leave(module, args, out):
        inside[0] += time.perf_counter() - since[0]

    handles = [blocks[0].register_forward_pre_hook(enter), blocks[-1].register_forward_hook(leave)]
    try:
        return dense_forward_seconds(model, calib), inside[0]
    finally:
        for h in handles:
            h.remove()


def one(run: str) -> dict:
    import torch

    from secateurs import calibration_data, load_model, prune
    from secateurs.api import environment

    torch.set_num_threads(2)
    method, setting = run.split(":", 1)
    cfg = protocol_config(method, setting)
    repeats, calib = [], None
    for _ in range(REPEATS):
        torch.manual_seed(0)
        model, tok = load_model("smollm2-135m")
        if calib is None:  # the same windows every repeat: tokenized once
            calib = calibration_data(tok, cfg)
        with torch.no_grad():
            model(calib[:1, :64], use_cache=False)  # warm-up
        before, in_blocks = blocks_seconds(model, calib)
        result = prune(model, cfg, calib, progress=False)
        after = dense_forward_seconds(model, calib)
        dense = (before + after) / 2
        walk, pruning = result.stage_seconds.get("calibrating", 0.0), result.stage_seconds.get("pruning", 0.0)
        repeats.append({"prune_seconds": round(result.prune_seconds, 2), "dense_before_seconds": round(before, 2),
                        "dense_after_seconds": round(after, 2),
                        "ratio": round(result.prune_seconds / dense, 3),
                        "walk_seconds": round(walk, 2), "walk_ratio": round(walk / dense, 3),
                        "pruning_seconds": round(pruning, 2),
                        "blocks_share": round(in_blocks / before, 3),
                        "sparsity": result.sparsity})
        del model, result

    def median(key):
        return statistics.median(r[key] for r in repeats)

    return {"run": run, "method": method, "pattern": cfg.pattern, "true_sequential": cfg.resolved.true_sequential,
            "repeats": repeats, "median_ratio": median("ratio"), "median_walk_ratio": median("walk_ratio"),
            "median_pruning_seconds": median("pruning_seconds"), "median_blocks_share": median("blocks_share"),
            **environment()}


def markdown(rows: list[dict], command: str) -> str:
    lines = page_head("Prune time ÷ one dense forward, repeated (SmolLM2-135M, quick protocol)", rows[0],
                      f"Every run: {REPEATS} times in one process, a freshly loaded model, one plain dense forward over "
                      "the quick protocol's calibration tokens (32 x 512, batch 8, logits included) timed before and "
                      "after pruning; ratio = prune wall time (calibration capture to end of pruning) / the mean of "
                      "the two. Each method runs its defaults (SparseGPT true-sequential, Wanda at once). "
                      "`reference` is the official reference code's ratio on the same protocol (from the issue).",
                      command)
    lines += ["| method | pattern | prune s (each) | dense fwd s (each, mean of before/after) | ratio (each) | "
              "median ratio | target | reference | walk ÷ dense fwd (each) | median walk | pruning stage s (each) "
              "| blocks' share of a dense fwd (median) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def each(value, fmt=".1f"):
            return ", ".join(format(value(x), fmt) for x in r["repeats"])

        lines.append(f"| {r['method']} | {r['pattern']} | {each(lambda x: x['prune_seconds'])} | "
                     f"{each(lambda x: (x['dense_before_seconds'] + x['dense_after_seconds']) / 2)} | "
                     f"{each(lambda x: x['ratio'], '.2f')} | **{r['median_ratio']:.2f}** | "
                     f"≤ {TARGET_RATIO[r['method']]} | {REFERENCE_RATIO.get(r['run'], '–')} | "
                     f"{each(lambda x: x['walk_ratio'], '.2f')} | {r['median_walk_ratio']:.2f} | "
                     f"{each(lambda x: x['pruning_seconds'], '.2f')} | {r['median_blocks_share']:.3f} |")
    lines += ["", "The walk is the `calibrating` stage of `PruneResult.stage_seconds`: capturing the first block's "
              "inputs and every pass of the calibration data through the blocks with the statistics they gather "
              "(input norms, `XᵀX`), the pruning excluded. The `pruning` stage is the rest: scores, masks, weight "
              "updates, checks and write-back. The blocks' share is the part of the first dense forward spent "
              "between the first block's input and the last block's output; the rest is the embeddings, the final "
              "norm and the LM head."]
    return "\n".join(lines + [""])


def describe(row: dict) -> str:
    ratios = ", ".join(f"{x['ratio']:.2f}" for x in row["repeats"])
    return (f"{row['run']:>14}: ratios {ratios}, median {row['median_ratio']:.2f} "
            f"(walk alone {row['median_walk_ratio']:.2f})")


def main() -> int:
    return benchmark_main(__file__, __doc__, RUNS, "prune_speed", one, markdown, describe)


if __name__ == "__main__":
    sys.exit(main())
