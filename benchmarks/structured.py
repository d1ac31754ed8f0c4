"""Structured pruning on the built-in model under the standard quick protocol (shared/DATA.md).

    python benchmarks/structured.py                       # every run below, ~45 min on 2 CPU cores
    python benchmarks/structured.py --runs channels:0.25,blocks:8

Runs (one fresh subprocess each, so memory and timings are its own):

* ``channels:F[:SCORE[+refit]]`` -- remove MLP channels worth a fraction ``F`` of the decoder blocks'
  parameters (the same number in every block, kept width a multiple of 32);
* ``heads:K``  -- remove ``K`` query heads from every KV group of every block;
* ``blocks:K[:angular]`` -- remove ``K`` whole blocks (Block Influence, or angular distance);
* ``wanda:F``  -- unstructured Wanda at sparsity ``F`` of the blocks' linear weights: the same number of
  parameters removed, for comparison (no speed: dense kernels run zeros at full cost).

Protocol: SmolLM2-135M, fp32, 2 threads, seed 0; calibration 32 x 512 tokens of enwiki train; perplexity on
the first 16 x 1024-token windows of enwiki test.  Speed is measured in the same process on the pruned model
and a copy of the dense one, alternating between them inside each of 7 repeats so that the shared machine's
drift hits both alike: prefill tokens/s on 1 x 512, decode ms/token over 64 tokens with the KV cache (medians).  Disk size is the saved ``model.safetensors``.  Results go to
``benchmarks/results/structured.{json,md}``.
"""

from __future__ import annotations

import copy
import sys

from common import benchmark_main, measured_on

RUNS = ["dense", "channels:0.1", "channels:0.2", "channels:0.25", "channels:0.3", "channels:0.25:wanda",
        "channels:0.25:magnitude", "channels:0.25:wanda+refit", "heads:1", "blocks:2", "blocks:4", "blocks:6",
        "blocks:8", "blocks:8:angular", "wanda:0.1", "wanda:0.2", "wanda:0.25", "wanda:0.3"]
CALIB_SAMPLES, CALIB_SEQLEN, ROUND_TO, REPEATS = 32, 512, 32, 7


def block_params(model) -> int:
    from secateurs.models import find_blocks

    return sum(p.numel() for p in find_blocks(model)[1].parameters())


def one(run: str) -> dict:
    import torch

    from secateurs import EvalConfig, PruneConfig, StructuredConfig, calibration_data, evaluate, load_model, prune
    from secateurs.api import environment
    from secateurs.data import load_text, tokenize
    from secateurs.eval import peak_rss_bytes, speed
    from secateurs.models import find_blocks
    from secateurs.structured.units import find_mlp

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model, tok = load_model("smollm2-135m")
    eval_ids = tokenize(tok, load_text("enwiki", "test"))
    dense_blocks = block_params(model)
    row = {"run": run, "dense_params": sum(p.numel() for p in model.parameters()), "dense_block_params": dense_blocks}
    kind, *rest = run.split(":")
    calib_cfg = dict(calib_data="enwiki", calib_samples=CALIB_SAMPLES, calib_seqlen=CALIB_SEQLEN, seed=0, batch_size=8)
    if kind == "dense":
        row.update(speed.measure_interleaved({"dense": model}, repeats=REPEATS)["dense"],
                   disk_bytes=speed.saved_bytes(model))
    elif kind == "wanda":
        cfg = PruneConfig(method="wanda", sparsity=float(rest[0]), **calib_cfg)
        result = prune(model, cfg, calibration_data(tok, cfg), progress=False)
        row.update(prune_seconds=round(result.prune_seconds, 2), removed_params=result.zeros)
    else:
        if kind == "channels":
            fraction = float(rest[0])
            score, _, refit = (rest[1] if len(rest) > 1 else "fluctuation").partition("+")
            _, blocks = find_blocks(model)
            mlp = find_mlp(blocks[0])
            per_channel = sum(m.weight.numel() // mlp.width for _, m in mlp.inputs) + mlp.output[1].weight.shape[0]
            count = round(fraction * dense_blocks / (per_channel * len(blocks)))
            keep = ROUND_TO * round((mlp.width - count) / ROUND_TO)
            cfg = StructuredConfig(method="channels", count=mlp.width - keep, score=score, refit=bool(refit), **calib_cfg)
        elif kind == "heads":
            cfg = StructuredConfig(method="heads", count=int(rest[0]), **calib_cfg)
        elif kind == "blocks":
            cfg = StructuredConfig(method="blocks", count=int(rest[0]), score=rest[1] if len(rest) > 1 else "bi",
                                   **calib_cfg)
        else:
            raise SystemExit(f"unknown run {run!r}")
        dense = copy.deepcopy(model)
        result = prune(model, cfg, calibration_data(tok, cfg), progress=False)
        timed = speed.measure_interleaved({"dense": dense, "pruned": model}, repeats=REPEATS)
        del dense
        dense_speed, pruned = timed["dense"], timed["pruned"]
        row.update(pruned, dense_speed=dense_speed, ratios=speed.speed_ratios(dense_speed, pruned),
                   disk_bytes=speed.saved_bytes(model), prune_seconds=round(result.prune_seconds, 2),
                   structured=[r.to_dict() for r in result.structured], block_scores=result.block_scores,
                   config=cfg.to_dict())
        row["removed_params"] = dense_blocks - block_params(model)
    row["removed_block_fraction"] = row.get("removed_params", 0) / dense_blocks
    row["perplexity"] = evaluate(model, tok, EvalConfig(data="enwiki", seqlen=1024, windows=16), ids=eval_ids,
                                 progress=False)
    row["peak_rss_bytes"] = peak_rss_bytes()
    row.update(environment())
    return row


def describe(r: dict) -> str:
    kind, *rest = r["run"].split(":")
    if kind == "channels":
        c = r["structured"][0]
        return f"MLP channels {c['before']}→{c['after']} ({rest[1] if len(rest) > 1 else 'fluctuation'})"
    if kind == "heads":
        c = r["structured"][0]
        return f"heads {c['before']}→{c['after']} per block ({rest[0]} per KV group)"
    if kind == "blocks":
        return f"{rest[0]} blocks ({rest[1] if len(rest) > 1 else 'BI'}: {sorted(c['block'] for c in r['structured'])})"
    if kind == "wanda":
        return f"unstructured Wanda {float(rest[0]):.0%} of block linears"
    return "dense"


def markdown(rows: list[dict], command: str) -> str:
    env = rows[0]
    dense = next((r for r in rows if r["run"] == "dense"), None)
    lines = [
        "# Structured pruning on the built-in model (SmolLM2-135M)",
        "",
        measured_on(env),
        "",
        "Calibration 32 x 512 tokens of enwiki train (seed 0); perplexity on the first 16 x 1024-token windows of "
        "enwiki test; fp32. `removed` = parameters removed / the dense decoder blocks' parameters (the tied "
        "embedding / LM head, 28.3M of the 134.5M, is never pruned). Speed-ups are pruned over dense measured in "
        "the same process, alternating between the pruned model and a copy of the dense one in each of 7 repeats: "
        "prefill tokens/s on 1 x 512 and decode ms/token over 64 tokens with the KV cache (medians). Disk = saved safetensors. Unstructured rows keep dense storage and dense "
        "kernels, so their size and speed are the dense model's (not re-measured).",
        "",
        f"Reproduce: `{command}`",
        "",
        "| run | what | removed | params | disk MiB | perplexity | prefill × | decode × | prune s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        disk = f"{r['disk_bytes'] / 2**20:.0f}" if "disk_bytes" in r else (
            f"{dense['disk_bytes'] / 2**20:.0f}" if dense else "–")
        params = r.get("params", r["dense_params"])
        if r["run"].startswith("wanda"):
            params = f"{r['dense_params'] - r['removed_params']:,} nonzero"
        else:
            params = f"{params:,}"
        ratios = r.get("ratios")
        pre = f"{ratios['prefill_speedup']:.2f}" if ratios else ("1 (ref)" if r["run"] == "dense" else "–")
        dec = f"{ratios['decode_speedup']:.2f}" if ratios else ("1 (ref)" if r["run"] == "dense" else "–")
        lines.append(f"| {r['run']} | {describe(r)} | {r['removed_block_fraction']:.1%} | {params} | {disk} | "
                     f"{r['perplexity']:.2f} | {pre} | {dec} | {r.get('prune_seconds', '–')} |")
    if dense:
        lines += ["", f"Dense: prefill {dense['prefill_tokens_per_s']['median']:.0f} tokens/s, decode "
                      f"{dense['decode_ms_per_token']['median']:.1f} ms/token."]
    return "\n".join(lines) + "\n"


def progress_line(row: dict) -> str:
    extra = f", prefill x{row['ratios']['prefill_speedup']:.2f}" if "ratios" in row else ""
    return f"{row['run']:>28}: perplexity {row['perplexity']:.3f}, removed {row['removed_block_fraction']:.1%}{extra}"


def main() -> int:
    return benchmark_main(__file__, __doc__, RUNS, "structured", one, markdown, progress_line)


if __name__ == "__main__":
    sys.exit(main())
