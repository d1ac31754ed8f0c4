"""Beyond the reference methods (issue 24), on the built-in model: OWL layer allocation and RIA so far.

    python benchmarks/beyond.py          # 16 runs, ~25 min on 2 CPU cores

Quick protocol (shared/DATA.md; see quick_protocol.py): Wanda and SparseGPT at 60, 70 and 80 % unstructured,
each with the uniform allocation (every layer the same sparsity) and with OWL (``allocation=owl``, its
defaults M = 5, lambda = 0.08: blocks with more outliers keep more, the mean sparsity kept); RIA (its default
a = 0.5, no channel permutation) at 60, 70, 80 % and 2:4.  Perplexity on the
protocol's windows and on the next 24 held-out windows; prune seconds and their ratio to one dense forward
over the calibration tokens (measured in the same process, after the prune).  The methods issue 24 adds next
(DSnoT, ALPS, SliceGPT, RIA's permutation) get their rows here as they land.  Results go to
``benchmarks/results/beyond.{json,md}``.
"""

from __future__ import annotations

import sys

from common import dense_forward_seconds, held_out_main, held_out_markdown, prune_and_score, protocol_config

RUNS = [f"{m}:{s}/{a}" for m in ("wanda", "sparsegpt") for s in ("0.6", "0.7", "0.8") for a in ("uniform", "owl")] + [
    f"ria:{s}/uniform" for s in ("0.6", "0.7", "0.8", "2:4")]


def one(run: str) -> dict:
    from secateurs import calibration_data, load_model

    spec, allocation = run.split("/")
    method, setting = spec.split(":", 1)
    row = {"run": run, "allocation": allocation, **prune_and_score(method, setting, allocation=allocation)}
    model, tok = load_model("smollm2-135m")
    row["dense_forward_seconds"] = round(dense_forward_seconds(model, calibration_data(tok, protocol_config(
        method, setting))), 2)
    row["forwards"] = round(row["prune_seconds"] / row["dense_forward_seconds"], 2)
    return row


def markdown(rows: list[dict]) -> str:
    return held_out_markdown(__file__, rows, "Beyond the reference methods: OWL allocation, RIA",
                             "`owl`: OWL's block sparsities (M 5, lambda 0.08). `sparsity` is measured over every "
                             "pruned layer (each row rounds down, so it lands up to 0.002 under the target). The "
                             "prune time includes OWL's walk of the dense model; `x fwd` is the prune time over one "
                             "dense forward of the calibration tokens in the same process.",
                             "sparsity, allocation (x fwd)",
                             lambda r: f"{r['sparsity']:.4f}, {r['allocation']} ({r['forwards']:.1f})")


def main() -> int:
    return held_out_main(__file__, __doc__, RUNS, "beyond", one, markdown)


if __name__ == "__main__":
    sys.exit(main())
