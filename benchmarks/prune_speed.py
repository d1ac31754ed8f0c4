"""Prune time against one dense forward, repeated: the ratio's spread on a shared machine.

    python benchmarks/prune_speed.py                  # Wanda and SparseGPT at 50%, 2:4 and 4:8, ~21-27 min on 2 cores
    python benchmarks/prune_speed.py --runs wanda:0.5

quick_protocol.py measures each method's ratio once, next to its perplexity.  On a shared virtual machine one
measurement can be off by a third (the machine slows down for a minute), so here every run measures it
REPEATS times in one fresh process, each time on a freshly loaded model: time one plain dense forward over the
quick protocol's calibration tokens (32 x 512, batch 8, logits included), prune, time the dense forward again;
ratio = prune seconds / the mean of the two forwards.  The page shows every repeat and the median.
"""

from __future__ import annotations

import statistics
import sys

from common import (REFERENCE_RATIO, TARGET_RATIO, benchmark_main, dense_forward_seconds, page_head,
                    protocol_config)

RUNS = ["wanda:0.5", "wanda:2:4", "wanda:4:8", "sparsegpt:0.5", "sparsegpt:2:4", "sparsegpt:4:8"]
REPEATS = 3


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
        before = dense_forward_seconds(model, calib)
        result = prune(model, cfg, calib, progress=False)
        after = dense_forward_seconds(model, calib)
        repeats.append({"prune_seconds": round(result.prune_seconds, 2), "dense_before_seconds": round(before, 2),
                        "dense_after_seconds": round(after, 2),
                        "ratio": round(result.prune_seconds / ((before + after) / 2), 3),
                        "sparsity": result.sparsity})
        del model, result
    ratios = [r["ratio"] for r in repeats]
    return {"run": run, "method": method, "pattern": cfg.pattern, "true_sequential": cfg.true_sequential,
            "repeats": repeats, "median_ratio": statistics.median(ratios), **environment()}


def markdown(rows: list[dict], command: str) -> str:
    lines = page_head("Prune time ÷ one dense forward, repeated (SmolLM2-135M, quick protocol)", rows[0],
                      f"Every run: {REPEATS} times in one process, a freshly loaded model, one plain dense forward over "
                      "the quick protocol's calibration tokens (32 x 512, batch 8, logits included) timed before and "
                      "after pruning; ratio = prune wall time (calibration capture to end of pruning) / the mean of "
                      "the two. Each method runs its defaults (SparseGPT true-sequential, Wanda at once). "
                      "`reference` is the official reference code's ratio on the same protocol (from the issue).",
                      command)
    lines += ["| method | pattern | prune s (each) | dense fwd s (each, mean of before/after) | ratio (each) | "
              "median ratio | target | reference |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def each(value, fmt=".1f"):
            return ", ".join(format(value(x), fmt) for x in r["repeats"])

        lines.append(f"| {r['method']} | {r['pattern']} | {each(lambda x: x['prune_seconds'])} | "
                     f"{each(lambda x: (x['dense_before_seconds'] + x['dense_after_seconds']) / 2)} | "
                     f"{each(lambda x: x['ratio'], '.2f')} | **{r['median_ratio']:.2f}** | "
                     f"≤ {TARGET_RATIO[r['method']]} | {REFERENCE_RATIO.get(r['run'], '–')} |")
    return "\n".join(lines + [""])


def describe(row: dict) -> str:
    ratios = ", ".join(f"{x['ratio']:.2f}" for x in row["repeats"])
    return f"{row['run']:>14}: ratios {ratios}, median {row['median_ratio']:.2f}"


def main() -> int:
    return benchmark_main(__file__, __doc__, RUNS, "prune_speed", one, markdown, describe)


if __name__ == "__main__":
    sys.exit(main())
