"""The standard quick benchmark protocol (shared/DATA.md) on the built-in model.

    python benchmarks/quick_protocol.py                 # every run below, ~25 min on 2 CPU cores
    python benchmarks/quick_protocol.py --runs wanda:0.5,sparsegpt:2:4

Protocol: SmolLM2-135M (built-in), fp32, torch.set_num_threads(2), seed 0; calibration = 32 windows of 512
tokens from enwiki train (random.seed(0), start = randint(0, len - 513)); evaluation = the first 16
non-overlapping 1024-token windows of enwiki test; every nn.Linear inside the decoder blocks is pruned.

Each run is a fresh subprocess so that its peak RSS is its own.  In the same process it also times one plain
dense forward of the model over the same calibration tokens (same batch size as pruning) and reports
``prune_seconds / dense_forward_seconds``.  Results go to ``benchmarks/results/quick_protocol.{json,md}``.
"""

from __future__ import annotations

import sys

from common import TARGET_RATIO, PeakRSS, benchmark_main, dense_forward_seconds, measured_on, protocol_config

RUNS = ["dense", "magnitude:0.5", "wanda:0.5", "sparsegpt:0.5", "sparsegpt:0.5/at-once",
        "magnitude:2:4", "wanda:2:4", "sparsegpt:2:4", "sparsegpt:2:4/at-once",
        "magnitude:4:8", "wanda:4:8", "sparsegpt:4:8", "sparsegpt:4:8/at-once"]
# "/at-once": true_sequential=False -- every input group observed on the unpruned block, as the reference code
REFERENCE = {  # the official reference code (Wanda's repository), CPU, same protocol -- from the issue
    "dense": 17.95, "magnitude:0.5": 371.5, "wanda:0.5": 40.81, "sparsegpt:0.5": 36.35, "wanda:2:4": 140.8,
    "sparsegpt:2:4": 67.16}
REFERENCE.update({f"{k}/at-once": v for k, v in REFERENCE.items() if k.startswith("sparsegpt")})


def one(run: str) -> dict:
    import torch

    from secateurs import EvalConfig, calibration_data, evaluate, load_model, prune
    from secateurs.api import environment
    from secateurs.data import load_text, tokenize
    from secateurs.eval import peak_rss_bytes

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model, tok = load_model("smollm2-135m")
    eval_cfg = EvalConfig(data="enwiki", seqlen=1024, windows=16)
    eval_ids = tokenize(tok, load_text("enwiki", "test"))
    row = {"run": run}
    if run != "dense":
        run, _, variant = run.partition("/")
        method, setting = run.split(":", 1)
        cfg = protocol_config(method, setting, **({"true_sequential": False} if variant == "at-once" else {}))
        calib = calibration_data(tok, cfg)
        with torch.no_grad():
            model(calib[:1, :64], use_cache=False)  # warm-up
        before = dense_forward_seconds(model, calib)
        with PeakRSS() as rss:  # pruning's own memory, apart from the timing forwards' logits
            result = prune(model, cfg, calib, progress=False)
        # timed again after pruning (dense kernels: zeros cost the same) to average out machine drift
        dense_forward = (before + dense_forward_seconds(model, calib)) / 2
        row.update(method=method + (" (at once)" if variant else ""), true_sequential=cfg.resolved.true_sequential,
                   pattern=cfg.pattern, target_sparsity=cfg.resolved.sparsity, sparsity=result.sparsity,
                   prune_seconds=round(result.prune_seconds, 2), dense_forward_seconds=round(dense_forward, 2),
                   ratio=round(result.prune_seconds / dense_forward, 3), stage_seconds=result.stage_seconds,
                   rss_before_prune_bytes=rss.before, prune_peak_rss_bytes=rss.peak)
    row["perplexity"] = evaluate(model, tok, eval_cfg, ids=eval_ids, progress=False)
    row["peak_rss_bytes"] = peak_rss_bytes()
    row["model_bytes_fp32"] = sum(p.numel() * p.element_size() for p in model.parameters())
    row.update(environment())
    return row


def mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.0f}"


def prune_rss(row: dict) -> str:
    """``peak (+added)`` in MiB, or a dash for rows measured before pruning's own memory was sampled."""
    if "prune_peak_rss_bytes" not in row:
        return "–"
    return f"{mib(row['prune_peak_rss_bytes'])} (+{mib(row['prune_peak_rss_bytes'] - row['rss_before_prune_bytes'])})"


def markdown(rows: list[dict], command: str) -> str:
    env = rows[0]
    lines = [
        "# Quick protocol on the built-in model (SmolLM2-135M)",
        "",
        measured_on(env),
        "",
        "Calibration 32 x 512 tokens of enwiki train (seed 0); perplexity on the first 16 x 1024-token windows of "
        "enwiki test; fp32; every linear layer inside the 30 decoder blocks pruned. `ratio` = prune wall time "
        "(calibration capture to end of pruning) / one plain dense forward of the model over the same "
        "calibration tokens (batch 8, as pruning), timed in the same process just before and just after pruning "
        "and averaged. `prune peak RSS` is the resident set sampled every 5 ms while `prune()` runs, and in brackets "
        "what pruning added to the resident set it started from (which already holds the model, the tokenized "
        "text and the runtime); `process peak RSS` is the whole run's process, which also holds the timing "
        "forwards' logits (8 x 512 x 49152 fp32 = 768 MiB) and evaluation's. `sparsegpt` is true-sequential "
        "(its default: q/k/v, then o, then gate/up, then down, each observed after the previous was pruned); "
        "`sparsegpt (at once)` observes every layer of a block on the unpruned block, as the reference code does "
        "(`--no-true-sequential`).",
        "",
        f"Reproduce: `{command}`",
        "",
        "| method | pattern | perplexity | reference | sparsity | prune s | dense fwd s | ratio | target ratio "
        "| prune peak RSS MiB | process peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ref = REFERENCE.get(r["run"])
        ref_s = f"{ref:.2f}" if ref else "–"
        rss = mib(r["peak_rss_bytes"])
        if r["run"] == "dense":
            lines.append(f"| dense | – | {r['perplexity']:.2f} | {ref_s} | 0 | – | – | – | – | – | {rss} |")
            continue
        tgt = TARGET_RATIO.get(r["method"].split()[0])
        lines.append(f"| {r['method']} | {r['pattern']} | {r['perplexity']:.2f} | {ref_s} | {r['sparsity']:.4f} | "
                     f"{r['prune_seconds']:.1f} | {r['dense_forward_seconds']:.1f} | {r['ratio']:.2f} | "
                     f"{'≤ ' + str(tgt) if tgt else '–'} | {prune_rss(r)} | {rss} |")
    size = rows[0]["model_bytes_fp32"] / 2**20
    lines += ["", f"The fp32 model alone is {size:.0f} MiB of parameters.", ""]
    return "\n".join(lines)


def describe(row: dict) -> str:
    return (f"{row['run']:>16}: perplexity {row['perplexity']:.3f}"
            + (f", sparsity {row['sparsity']:.4f}, prune {row['prune_seconds']:.1f} s, ratio {row['ratio']:.2f}"
               if "ratio" in row else "")
            + (f", prune peak RSS {prune_rss(row)} MiB" if "prune_peak_rss_bytes" in row else "")
            + f", process peak RSS {mib(row['peak_rss_bytes'])} MiB")


def main() -> int:
    return benchmark_main(__file__, __doc__, RUNS, "quick_protocol", one, markdown, describe)


if __name__ == "__main__":
    sys.exit(main())
