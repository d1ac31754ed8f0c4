"""True-sequential or at once: which calibration order prunes the built-in model better, and how fast.

    python benchmarks/true_sequential.py          # 10 runs, ~25 min on 2 CPU cores

Quick protocol (shared/DATA.md; see quick_protocol.py) for SparseGPT at 50%, 2:4 and 4:8 and Wanda at 50% and 2:4, each with
``true_sequential`` off (every layer of a block observed on the unpruned block, as the reference code) and on
(q/k/v, then o, then gate/up, then down, each observed after the previous group was pruned).  Perplexity is
measured on the protocol's windows (the first 16 x 1024 tokens of enwiki test) and, so that the choice of
default is not made on the figures it is reported with, on the next 24 windows (held out).
Results go to ``benchmarks/results/true_sequential.{json,md}``.
"""

from __future__ import annotations

import sys

from common import held_out_main, held_out_markdown, prune_and_score

RUNS = [f"{m}:{s}/{order}" for m in ("sparsegpt", "wanda") for s in ("0.5", "2:4", "4:8")
        for order in ("at-once", "sequential") if not (m == "wanda" and s == "4:8")]


def one(run: str) -> dict:
    spec, order = run.split("/")
    method, setting = spec.split(":", 1)
    return {"run": run, **prune_and_score(method, setting, true_sequential=order == "sequential")}


def markdown(rows: list[dict]) -> str:
    return held_out_markdown(__file__, rows, "True-sequential or at once",
                             "Prune seconds are indicative (timed comparisons: quick_protocol.md).", "order",
                             lambda r: "true-sequential" if r["true_sequential"] else "at once")


def main() -> int:
    return held_out_main(__file__, __doc__, RUNS, "true_sequential", one, markdown)


if __name__ == "__main__":
    sys.exit(main())
