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

import argparse
import json
import sys
from pathlib import Path

from common import measured_on, run_each

HERE = Path(__file__).resolve().parent
RUNS = [f"{m}:{s}/{order}" for m in ("sparsegpt", "wanda") for s in ("0.5", "2:4", "4:8")
        for order in ("at-once", "sequential") if not (m == "wanda" and s == "4:8")]
PROTOCOL_WINDOWS, HELD_OUT_WINDOWS, SEQLEN = 16, 24, 1024


def one(run: str) -> dict:
    import torch

    from secateurs import EvalConfig, PruneConfig, calibration_data, evaluate, load_model, prune
    from secateurs.api import environment
    from secateurs.data import load_text, tokenize

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model, tok = load_model("smollm2-135m")
    ids = tokenize(tok, load_text("enwiki", "test"))
    spec, order = run.split("/")
    method, setting = spec.split(":", 1)
    nm = ":" in setting
    cfg = PruneConfig(method=method, pattern=setting if nm else "unstructured", sparsity=None if nm else float(setting),
                      calib_data="enwiki", calib_samples=32, calib_seqlen=512, seed=0, batch_size=8,
                      true_sequential=order == "sequential")
    result = prune(model, cfg, calibration_data(tok, cfg), progress=False)
    held_out = ids[PROTOCOL_WINDOWS * SEQLEN:]
    return {"run": run, "method": method, "pattern": cfg.pattern, "true_sequential": cfg.true_sequential,
            "sparsity": result.sparsity, "prune_seconds": round(result.prune_seconds, 2),
            "perplexity": evaluate(model, tok, EvalConfig(seqlen=SEQLEN, windows=PROTOCOL_WINDOWS), ids=ids,
                                   progress=False),
            "held_out_perplexity": evaluate(model, tok, EvalConfig(seqlen=SEQLEN, windows=HELD_OUT_WINDOWS),
                                            ids=held_out, progress=False),
            **environment()}


def markdown(rows: list[dict]) -> str:
    lines = ["# True-sequential or at once (SmolLM2-135M, quick protocol)", "", measured_on(rows[0]), "",
             "Calibration 32 x 512 tokens of enwiki train (seed 0), batch 8, fp32. `protocol` = perplexity on the "
             "first 16 x 1024-token windows of enwiki test (the quick protocol); `held out` = the next 24 windows. "
             "Prune seconds are indicative (timed comparisons: quick_protocol.md).",
             "", "Reproduce: `python benchmarks/true_sequential.py`", "",
             "| method | pattern | order | protocol ppl | held-out ppl | prune s |", "|---|---|---|---|---|---|"]
    for r in rows:
        order = "true-sequential" if r["true_sequential"] else "at once"
        lines.append(f"| {r['method']} | {r['pattern']} | {order} | {r['perplexity']:.2f} | "
                     f"{r['held_out_perplexity']:.2f} | {r['prune_seconds']:.1f} |")
    return "\n".join(lines + [""])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default=",".join(RUNS), help="comma list of METHOD:SETTING/at-once|sequential")
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one)))
        return 0

    def on_row(rows, seconds):
        r = rows[-1]
        print(f"{r['run']:>24}: ppl {r['perplexity']:.3f}, held out {r['held_out_perplexity']:.3f}, "
              f"prune {r['prune_seconds']:.1f} s ({seconds:.0f} s)", flush=True)

    rows = run_each(__file__, [r for r in args.runs.split(",") if r], [], on_row)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "true_sequential.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out / "true_sequential.md").write_text(markdown(rows))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
