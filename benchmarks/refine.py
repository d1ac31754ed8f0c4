"""What re-fitting the kept weights (``refine="admm"``) adds to each method on the built-in model.

    python benchmarks/refine.py          # 16 runs, ~45 min on 2 CPU cores

Quick protocol (shared/DATA.md; see quick_protocol.py) for magnitude at 50% and 2:4 and for Wanda and SparseGPT
at 50%, 2:4 and 4:8, each without (``none``) and with ADMM weight reconstruction on the method's own mask
(iterations 20, damping 0.1: the defaults of Boza 2024's code, kept after damping 0.01 and 5 or 10 iterations
did worse on SparseGPT 2:4).  Each method keeps its own default calibration order (SparseGPT true-sequential,
the others at once).  Perplexity on the protocol's windows and on the next 24 held-out windows.  Results go to
``benchmarks/results/refine.{json,md}``.
"""

from __future__ import annotations

import sys

from common import held_out_main, held_out_markdown, prune_and_score

RUNS = [f"{m}:{s}/{refine}" for m in ("magnitude", "wanda", "sparsegpt") for s in ("0.5", "2:4", "4:8")
        for refine in ("none", "admm") if not (m == "magnitude" and s == "4:8")]


def one(run: str) -> dict:
    spec, refine = run.split("/")
    method, setting = spec.split(":", 1)
    return {"run": run, **prune_and_score(method, setting, refine=refine)}


def markdown(rows: list[dict]) -> str:
    return held_out_markdown(__file__, rows, "Weight reconstruction on the mask: none or ADMM",
                             "Every linear of the 30 blocks pruned; measured sparsity 0.5000 in every run (the JSON "
                             "has it). `admm` keeps each method's mask and re-fits the kept weights to the dense "
                             "layer's outputs (20 iterations, damping 0.1). Prune seconds are indicative.",
                             "refine", lambda r: r["refine"])


def main() -> int:
    return held_out_main(__file__, __doc__, RUNS, "refine", one, markdown)


if __name__ == "__main__":
    sys.exit(main())
