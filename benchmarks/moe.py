"""Time and memory of pruning a mixture of experts: random-weight bf16 checkpoints of real MoE shapes, at reduced depth.

    python benchmarks/moe.py                          # every run below (~45 min on 2 CPU cores)
    python benchmarks/moe.py --runs olmoe:wanda

No real mixture of experts ships offline, so quality cannot be measured here; this page measures what a real
one costs.  Each shape is built once with random weights (transformers' own initialisation) and saved by
``save_pretrained`` in bf16 as transformers writes it -- one tensor per expert, under names it converts on
loading -- in ``$SECATEURS_MOE_DIR`` (default ``/tmp/secateurs-moe``), never committed.  Calibration: 8 x 256
tokens of the built-in enwiki text (batch 8), 2 threads, a fresh process per run.  The in-memory runs load it
whole (``secateurs.load_model``) and prune it through the API; the load's peak (``ru_maxrss``), the resident
set once loaded and the prune's peak above it (sampled every 5 ms) are measured apart.  The ``-streamed`` runs
are the command line's default path: the folder converted once into the cache, then streamed.

Shapes (the real model's widths, fewer blocks): OLMoE-1B-7B (hidden 2048, 64 experts of 1024, 8 per token,
2 of its 16 blocks), Qwen3-30B-A3B (hidden 2048, 128 experts of 768, 8 per token, 2 of its 48 blocks) and
Mixtral-8x7B (hidden 4096, 8 experts of 14336, 2 per token, 1 of its 32 blocks; vocabulary 49,152, the
built-in tokenizer's, for its 32,000).  ``sparsegpt-all`` holds every expert's statistics at once (the
budget lifted) to show what the 1 GiB budget on experts' statistics saves; ``experts`` removes half of the
experts (REAP).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import benchmark_main, build_apart, finish_checkpoint, folder_bytes

SHAPES = {  # name: (family, config fields)
    "olmoe": ("olmoe", dict(hidden_size=2048, intermediate_size=1024, num_experts=64, num_experts_per_tok=8,
                            num_attention_heads=16, num_key_value_heads=16, vocab_size=50304, num_hidden_layers=2)),
    "qwen3moe": ("qwen3_moe", dict(hidden_size=2048, moe_intermediate_size=768, intermediate_size=6144,
                                   num_experts=128, num_experts_per_tok=8, num_attention_heads=32,
                                   num_key_value_heads=4, head_dim=128, vocab_size=151936, num_hidden_layers=2)),
    "mixtral": ("mixtral", dict(hidden_size=4096, intermediate_size=14336, num_local_experts=8, num_experts_per_tok=2,
                                num_attention_heads=32, num_key_value_heads=8, vocab_size=49152, num_hidden_layers=1)),
}
REAL_DEPTH = {"olmoe": 16, "qwen3moe": 48, "mixtral": 32}
RUNS = [f"{s}:{m}" for s in SHAPES for m in ("wanda", "sparsegpt", "sparsegpt-all", "experts", "wanda-streamed",
                                              "sparsegpt-streamed")]
UNBOUNDED = 1 << 50


def scratch() -> Path:
    return Path(os.environ.get("SECATEURS_MOE_DIR", "/tmp/secateurs-moe"))


def build_checkpoint(name: str) -> Path:
    """The random-weight bf16 checkpoint of shape ``name``, saved as transformers saves it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = scratch() / name
    if (folder / "config.json").exists():
        return folder
    family, fields = SHAPES[name]
    config = AutoConfig.for_model(family, **fields, max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    tmp = scratch() / f".{name}-building"
    model.save_pretrained(tmp)
    return finish_checkpoint(tmp, folder)


def streamed(run: str) -> dict:
    """The command line's own path: the checkpoint converted once to the model's layout (a process of its own,
    timed, its peak measured), then ``secateurs prune`` streaming it one block at a time (its peak measured)."""
    name, method = run.split(":")
    method = method.removesuffix("-streamed")
    build_apart("moe", name)
    env = {**os.environ, "SECATEURS_CACHE": str(scratch() / "cache")}

    def measured(args: list, log: Path) -> tuple[float, int]:
        t = time.perf_counter()
        with open(log, "w") as out:
            proc = subprocess.Popen([sys.executable, *args], stdout=out, stderr=subprocess.STDOUT, env=env)
            _, status, usage = os.wait4(proc.pid, 0)
        if os.waitstatus_to_exitcode(status):
            raise SystemExit(f"{run}: {log.read_text().strip().splitlines()[-1]}")
        return time.perf_counter() - t, usage.ru_maxrss * 1024

    folder, out, report = scratch() / name, scratch() / f"out-{name}-{method}", scratch() / f"report-{run}.json"
    os.environ["SECATEURS_CACHE"] = env["SECATEURS_CACHE"]
    from secateurs.models.convert import cache_of

    converted_now = not (cache_of(folder) / "config.json").exists()  # the first run of a shape converts it
    convert_s, convert_peak = measured(["-c", f"from secateurs.models.load import streamable; "
                                              f"assert streamable({str(folder)!r}) is not None"],
                                       scratch() / f"log-convert-{name}.txt")
    wall, peak = measured(["-m", "secateurs.cli", "prune", "--model", str(folder), "--method", method, "--sparsity",
                           "0.5", "--calib-samples", "8", "--calib-seqlen", "256", "--no-eval", "--output", str(out),
                           "--overwrite", "--threads", "2", "--quiet", "--report", str(report)],
                          scratch() / f"log-{run}.txt")
    r = json.loads(report.read_text())
    for p in out.glob("*.safetensors"):
        p.unlink()
    family, fields = SHAPES[name]
    return {"run": run, "shape": name, "method": run.split(":")[1], "blocks": fields["num_hidden_layers"],
            "real_blocks": REAL_DEPTH[name], "params": r["total_params"],
            "checkpoint_bytes": folder_bytes(folder), "converted_now": converted_now,
            "convert_seconds": round(convert_s, 1),
            "convert_peak_rss_bytes": convert_peak, "peak_rss_bytes": peak, "prune_seconds": r["prune_seconds"],
            "wall_seconds": round(wall, 1), "streamed": r["streamed"], "sparsity": r["sparsity"],
            "versions": r["versions"], "machine": r["machine"], "measured_at": r["measured_at"]}


def one(run: str) -> dict:
    """Load the checkpoint, prune it in this process (a fresh one per run) and measure: the load's peak, the
    resident set before the prune and the prune's own peak above it (sampled), seconds, and for expert removal
    the parameters, bytes and CPU speed before and after."""
    import resource

    import torch

    from common import PeakRSS, rss_bytes

    if run.endswith("-streamed"):
        return streamed(run)
    name, method = run.split(":")
    build_apart("moe", name)
    from secateurs import PruneConfig, StructuredConfig, calibration_data, load_model, prune
    from secateurs.api import environment
    from secateurs.engine import sequential
    from secateurs.eval.speed import measure

    torch.set_num_threads(2)
    if method.endswith("-all"):
        sequential.EXPERT_STATS_BYTES = UNBOUNDED
    calib = dict(calib_samples=8, calib_seqlen=256, batch_size=8)
    removal = method.startswith("experts")
    cfg = StructuredConfig(method="experts", ratio=0.5, **calib) if removal else \
        PruneConfig(method=method.removesuffix("-all"), sparsity=0.5, **calib)
    t = time.perf_counter()
    model, tok = load_model(str(scratch() / name))
    load_seconds = time.perf_counter() - t
    load_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    ids = calibration_data(tok, cfg)
    params = sum(p.numel() for p in model.parameters())
    speed = measure(model, seqlen=256, new_tokens=16, repeats=3) if removal else None
    loaded = rss_bytes()
    with PeakRSS() as peak:
        result = prune(model, cfg, ids, progress=False)
    family, fields = SHAPES[name]
    experts = fields.get("num_experts") or fields["num_local_experts"]
    inter = fields.get("moe_intermediate_size") or fields["intermediate_size"]
    row = {"run": run, "shape": name, "method": method, "blocks": fields["num_hidden_layers"],
           "real_blocks": REAL_DEPTH[name], "experts": experts, "top_k": fields["num_experts_per_tok"],
           "hidden": fields["hidden_size"], "expert_width": inter, "params": params,
           "checkpoint_bytes": folder_bytes(scratch() / name), "load_seconds": round(load_seconds, 1),
           "load_peak_rss_bytes": load_peak, "loaded_rss_bytes": loaded, "prune_peak_rss_bytes": peak.peak,
           "prune_extra_bytes": peak.peak - peak.before, "prune_seconds": round(result.prune_seconds, 1),
           "seconds_per_block": round(result.prune_seconds / fields["num_hidden_layers"], 1),
           "experts_stats_bytes_per_block": (fields["hidden_size"] ** 2 + inter**2) * 4 * experts
           if "sparsegpt" in method else None,
           "budget_bytes": None if method.endswith("-all") else sequential.EXPERT_STATS_BYTES, **environment()}
    if removal:
        after = measure(model, seqlen=256, new_tokens=16, repeats=3)
        row.update(params_after=sum(p.numel() for p in model.parameters()), experts_after=result.structured[0].after,
                   bytes_before=2 * params, bytes_after=2 * sum(p.numel() for p in model.parameters()),
                   prefill_before=speed["prefill_tokens_per_s"]["median"],
                   prefill_after=after["prefill_tokens_per_s"]["median"],
                   decode_ms_before=speed["decode_ms_per_token"]["median"],
                   decode_ms_after=after["decode_ms_per_token"]["median"])
    else:
        row.update(sparsity=result.sparsity, expert_matrices=result.experts["matrices"],
                   by_magnitude=result.experts["by_magnitude"])
    return row


def markdown(rows: list, command: str) -> str:
    from common import page_head

    lines = page_head("Mixtures of experts: prune time and memory, random-weight bf16 checkpoints of real shapes",
                      rows[0], "\n\n".join(__doc__.split("\n\n")[2:4]).strip(), command)
    prunes = [r for r in rows if not r["method"].startswith("experts") and not r["method"].endswith("-streamed")]
    lines += ["## Weight pruning, 50 %", "",
              "| run | blocks (of) | experts x width, top-k | params | checkpoint GB | load peak GiB | loaded GiB | "
              "prune peak GiB (above loaded) | experts' X^T X per block GiB | prune s | s / block | sparsity | "
              "by magnitude |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in prunes:
        stats = f"{r['experts_stats_bytes_per_block'] / 2**30:.2f}" if r["experts_stats_bytes_per_block"] else "–"
        lines.append(f"| {r['run']} | {r['blocks']} ({r['real_blocks']}) | {r['experts']} x {r['expert_width']}, "
                     f"{r['top_k']} | {r['params'] / 1e9:.2f}B | {r['checkpoint_bytes'] / 1e9:.2f} | "
                     f"{r['load_peak_rss_bytes'] / 2**30:.2f} | {r['loaded_rss_bytes'] / 2**30:.2f} | "
                     f"{r['prune_peak_rss_bytes'] / 2**30:.2f} (+{r['prune_extra_bytes'] / 2**30:.2f}) | {stats} | "
                     f"{r['prune_seconds']:.0f} | {r['seconds_per_block']:.1f} | {r['sparsity']:.4f} | "
                     f"{r['by_magnitude']} of {r['expert_matrices']} |")
    streams = [r for r in rows if r["method"].endswith("-streamed")]
    if streams:
        lines += ["", "## The command line: converted once, then streamed", "",
                  "`secateurs prune --model DIR ...` on the same folder: its per-expert tensors are first written once "
                  "under the model's own names into the cache (`secateurs.models.convert`, one block at a time; "
                  "timed in a process of its own, when a shape's first run made it), then the prune streams it one "
                  "block at a time. Peak = the whole prune process's `ru_maxrss`.", "",
                  "| run | checkpoint GB | conversion s (peak GiB) | prune peak GiB | prune s | sparsity |",
                  "|---|---|---|---|---|---|"]
        for r in streams:
            convert = (f"{r['convert_seconds']:.0f} ({r['convert_peak_rss_bytes'] / 2**30:.2f})" if r["converted_now"]
                       else "cached")
            lines.append(f"| {r['run']} | {r['checkpoint_bytes'] / 1e9:.2f} | {convert} | "
                         f"{r['peak_rss_bytes'] / 2**30:.2f} | {r['prune_seconds']:.0f} | {r['sparsity']:.4f} |")
    removals = [r for r in rows if r["method"].startswith("experts")]
    if removals:
        lines += ["", "## Removing half of the experts (`--method experts --ratio 0.5`, REAP)", "",
                  "Speed: one forward of 256 random tokens (prefill) and 16 decoded tokens after a 32-token prompt, "
                  "medians of 3, 2 threads, before and after in the same process.", "",
                  "| run | experts | params | bf16 bytes GB | prefill tok/s | decode ms/token | prune s | "
                  "prune peak GiB (above loaded) |", "|---|---|---|---|---|---|---|---|"]
        for r in removals:
            lines.append(f"| {r['run']} | {r['experts']} → {r['experts_after']} | {r['params'] / 1e9:.2f}B → "
                         f"{r['params_after'] / 1e9:.2f}B | {r['bytes_before'] / 1e9:.2f} → {r['bytes_after'] / 1e9:.2f} | "
                         f"{r['prefill_before']:.0f} → {r['prefill_after']:.0f} | {r['decode_ms_before']:.1f} → "
                         f"{r['decode_ms_after']:.1f} | {r['prune_seconds']:.0f} | "
                         f"{r['prune_peak_rss_bytes'] / 2**30:.2f} (+{r['prune_extra_bytes'] / 2**30:.2f}) |")
    return "\n".join(lines + [""])


if __name__ == "__main__":
    sys.exit(benchmark_main(__file__, __doc__, RUNS, "moe", one, markdown,
                            lambda r: f"{r['run']:>26}: peak "
                                      f"{r.get('prune_peak_rss_bytes', r.get('peak_rss_bytes')) / 2**30:.2f} GiB, "
                                      f"prune {r['prune_seconds']:.0f} s"))
