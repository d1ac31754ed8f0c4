"""How the cost of a streamed prune grows with the model: random-weight Llama-shaped bf16 checkpoints.

    python benchmarks/scaling.py                      # every run below (~20 min on 2 CPU cores)
    python benchmarks/scaling.py --runs d22:wanda,llama3b:wanda

Each shape is written once as a real sharded bf16 safetensors checkpoint (random weights, std 0.02; the
built-in model's tokenizer, so the vocabulary is at least its 49,152) in ``$SECATEURS_SCALING_DIR``
(default ``/tmp/secateurs-scaling``), never committed.  Each run prunes it with the command below, in a fresh
process whose peak resident memory (``ru_maxrss``) is the figure:

    secateurs prune --model DIR --method M --sparsity 0.5 --calib-samples 8 --calib-seqlen 256 --no-eval \\
                    --output OUT --threads 2

Shapes: depth varied at TinyLlama's width (2048, MLP 5632, 32 heads, 4 KV heads: 2 to 22 blocks, the last
being TinyLlama's 1.1B), width varied at 16 blocks (1024 to 3072), and Llama-3.2-3B's shape (3072, MLP 8192,
28 blocks, 24 heads, 8 KV heads, vocabulary 128,256, tied embeddings: 3.2B parameters, 6.4 GB).
Results go to ``benchmarks/results/scaling.{json,md,png}``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import benchmark_main, build_apart, finish_checkpoint, folder_bytes

SHAPES = {  # name: (hidden, intermediate, blocks, heads, kv heads, vocabulary, tied)
    "small": (768, 2048, 8, 12, 4, 49152, True),
    "d2": (2048, 5632, 2, 32, 4, 49152, False),
    "d6": (2048, 5632, 6, 32, 4, 49152, False),
    "d11": (2048, 5632, 11, 32, 4, 49152, False),
    "d22": (2048, 5632, 22, 32, 4, 49152, False),  # TinyLlama-1.1B's shape
    "w1024": (1024, 2816, 16, 16, 4, 49152, False),
    "w2048": (2048, 5632, 16, 32, 4, 49152, False),
    "w3072": (3072, 8192, 16, 24, 8, 49152, False),
    "llama3b": (3072, 8192, 28, 24, 8, 128256, True),  # Llama-3.2-3B's shape
}
RUNS = [f"{s}:wanda" for s in SHAPES] + [f"{s}:sparsegpt" for s in ("d2", "d11", "d22", "llama3b")]


def scratch() -> Path:
    return Path(os.environ.get("SECATEURS_SCALING_DIR", "/tmp/secateurs-scaling"))


def build_checkpoint(name: str) -> Path:
    """The random-weight bf16 checkpoint of shape ``name``, one shard per block, written block by block so that
    building it never holds more than one block (and the embeddings) in memory."""
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    folder = scratch() / name
    if (folder / "model.safetensors.index.json").exists():
        return folder
    hidden, inter, blocks, heads, kv, vocab, tied = SHAPES[name]
    config = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=blocks,
                         num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                         tie_word_embeddings=tied, max_position_embeddings=4096, dtype="bfloat16")
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    scratch().mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=scratch()))
    g = torch.Generator().manual_seed(0)
    shards = [[n for n, _ in model.named_parameters() if n.startswith(f"model.layers.{i}.")] for i in range(blocks)]
    rest = [n for n, _ in model.named_parameters() if not n.startswith("model.layers.")
            and not (tied and n == "lm_head.weight")]  # a tied head is the embedding: real checkpoints omit it
    shapes = dict((n, p.shape) for n, p in model.named_parameters())
    weight_map, total = {}, 0
    for k, names in enumerate(shards + [rest], 1):
        file = f"model-{k:05d}-of-{len(shards) + 1:05d}.safetensors"
        tensors = {n: (torch.ones(shapes[n]) if "norm" in n else torch.randn(shapes[n], generator=g) * 0.02)
                   .to(torch.bfloat16) for n in names}
        save_file(tensors, tmp / file, metadata={"format": "pt"})
        weight_map.update({n: file for n in names})
        total += sum(t.numel() * 2 for t in tensors.values())
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}, indent=2))
    config.save_pretrained(tmp)
    return finish_checkpoint(tmp, folder)


def one(run: str) -> dict:
    name, method = run.split(":")
    build_apart("scaling", name)
    folder = scratch() / name
    out = scratch() / f"out-{name}-{method}"
    report = scratch() / f"report-{name}-{method}.json"
    cmd = [sys.executable, "-m", "secateurs.cli", "prune", "--model", str(folder), "--method", method,
           "--sparsity", "0.5", "--calib-samples", "8", "--calib-seqlen", "256", "--no-eval", "--output", str(out),
           "--overwrite", "--threads", "2", "--quiet", "--report", str(report)]
    log = scratch() / f"log-{name}-{method}.txt"
    t = time.perf_counter()
    with open(log, "w") as out_log:
        proc = subprocess.Popen(cmd, stdout=out_log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # the prune's own peak, not that of whatever ran before it
    wall = time.perf_counter() - t
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"{run}: {log.read_text().strip().splitlines()[-1]}")
    peak = usage.ru_maxrss * 1024
    r = json.loads(report.read_text())
    hidden, inter, blocks, heads, kv, vocab, tied = SHAPES[name]
    out_config = json.loads((out / "config.json").read_text())
    row = {"run": run, "shape": name, "method": method, "hidden": hidden, "intermediate": inter, "blocks": blocks,
           "vocab": vocab, "params": r["total_params"], "checkpoint_bytes": folder_bytes(folder),
           "output_bytes": folder_bytes(out), "output_dtype": out_config.get("dtype") or out_config.get("torch_dtype"),
           "sparsity": r["sparsity"], "peak_rss_bytes": peak, "prune_seconds": r["prune_seconds"],
           "seconds_per_block": r["prune_seconds"] / blocks, "wall_seconds": round(wall, 1),
           "versions": r["versions"], "machine": r["machine"], "measured_at": r["measured_at"], "commit": commit()}
    for p in out.glob("*.safetensors"):  # the output is measured: free the disk for the next run
        p.unlink()
    return row


def commit() -> "str | None":
    """The code measured: this checkout's commit (with ``+`` when it has uncommitted changes), or None outside git."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "../src"], cwd=here,
                               capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+" if dirty else "")


def markdown(rows: list, command: str) -> str:
    from common import page_head

    lines = page_head("Scaling: streamed prune of random-weight Llama-shaped bf16 checkpoints", rows[0], "\n\n".join(
        __doc__.split("\n\n")[2:5]).strip(), command)
    lines += ["| run | blocks | hidden | params | checkpoint GB | output GB | output dtype | peak RSS GiB | prune s | "
              "s / block | sparsity | code |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['blocks']} | {r['hidden']} | {r['params'] / 1e9:.2f}B | "
                     f"{r['checkpoint_bytes'] / 1e9:.2f} | {r['output_bytes'] / 1e9:.2f} | {r['output_dtype']} | "
                     f"{r['peak_rss_bytes'] / 2**30:.2f} | {r['prune_seconds']:.0f} | {r['seconds_per_block']:.1f} | "
                     f"{r['sparsity']:.4f} | {r.get('commit') or '?'} |")
    lines += ["", "Repeated runs of one shape differed by up to ~0.35 GiB in peak RSS (this script on 2026-12-06 on an "
              "Intel Xeon, the code of that day, checkpoints already built: d22:wanda 0.90 to 1.00 GiB, "
              "d22:sparsegpt 1.33 to 1.69, llama3b:wanda 1.42 to 1.58, llama3b:sparsegpt 1.94 to 2.14). Earlier "
              "pages showed more "
              "for a shape whose checkpoint had just been built: the builder's memory was counted as the prune's "
              "peak (a forked child's `ru_maxrss` keeps its parent's high-water mark); checkpoints are now built in "
              "a process of their own. On 2026-12-07 (AMD EPYC, commit 7cb256b) a second llama3b:sparsegpt run, its "
              "resident set sampled every 20 ms from another process, peaked at 1.37 GiB, reached by its 8th block "
              "and flat after; two blocks of that shape peaked at 1.29 GiB (the same commit) and 1.22 GiB (its "
              "working tree a quarter of an hour before it was committed). The `code` column "
              "is the commit measured.", "",
              "![peak RSS and prune time against model size](scaling.png)", ""]
    return "\n".join(lines + projection(rows))


# --------------------------------------------------------------------------- Llama-3-70B, by calculation

LLAMA3_70B = (8192, 28672, 80, 64, 8, 128256, False)
PAPERS_TOKENS = 128 * 2048  # the papers' calibration, against this benchmark's 8 x 256
GPU_BATCH_TOKENS = 8 * 2048  # one batch on the card


def matrices(shape) -> list:
    """(rows, cols) of each linear layer of one block: q, k, v, o, gate, up, down."""
    hidden, inter, _, heads, kv, _, _ = shape
    kv_width = hidden // heads * kv
    return [(hidden, hidden), (kv_width, hidden), (kv_width, hidden), (hidden, hidden), (inter, hidden),
            (inter, hidden), (hidden, inter)]


def block_params(shape) -> int:
    return sum(r * c for r, c in matrices(shape))


def block_bytes(shape, method: str, tokens: int) -> int:
    """What one block adds to the resident set at its peak, by arithmetic: the block in bf16, the calibration
    activations (its inputs and outputs, bf16), and the method's work.  Wanda: one matrix at a time, a few rows
    at a time in bf16 (the pruned copy, 2 bytes a weight; its mask and verification's, 3; the verified copy of
    the matrix sharing its input, waiting, 2: 7 bytes a weight; one float32 chunk of 16 MiB aside).
    SparseGPT, true-sequential: one input group at a time (q/k/v, o, gate/up, down), holding its ``X^T X`` (its
    damped inverse factor is built in the same matrix), the float32 copies of the group's matrices (4 bytes a
    weight) and, for the one being swept and verified, its mask, its result in bf16 and verification's mask
    (4 bytes a weight); the largest group sets the peak."""
    hidden = shape[0]
    m = matrices(shape)
    base = 2 * block_params(shape) + 2 * 2 * tokens * hidden
    if method == "wanda":
        return base + 7 * max(r * c for r, c in m)
    groups = [m[0:3], m[3:4], m[4:6], m[6:7]]  # the layers that read one input
    return base + max(4 * g[0][1] ** 2 + 4 * sum(r * c for r, c in g) + 4 * max(r * c for r, c in g)
                      for g in groups)


def block_work(shape, method: str) -> float:
    """The calculation's cost of pruning one block: Wanda's forward and scores are linear in the weights;
    SparseGPT's updates cost rows x cols^2 per matrix and its inverses cols^3 per input."""
    if method == "wanda":
        return float(block_params(shape))
    hidden, inter = shape[0], shape[1]
    return float(sum(r * c * c for r, c in matrices(shape)) + 3 * hidden**3 + inter**3)


def projection(rows: list) -> list[str]:
    """The Llama-3-70B lines of the page: from each method's largest measured run, scaled by the arithmetic
    above (a calculation, not a measurement), and the same arithmetic checked against a smaller measured run."""
    tokens = 8 * 256
    lines = ["## Llama-3-70B, by calculation (not measured)", "",
             "From each method's largest measured run (the reference), scaled by arithmetic: peak RSS = the "
             "reference's + (what a 70B block adds − what the reference's block adds), counting the block in "
             "bf16, its calibration activations and the method's float32 work (`block_bytes` in the script); "
             "time = the reference's seconds per block × (the 70B block's work ÷ the reference block's: Wanda "
             "linear in the weights, SparseGPT rows·cols² per matrix plus cols³ per input, `block_work`) × 80 "
             "blocks. Llama-3-70B: width 8192, MLP 28672, 64 heads, 8 KV heads, 80 blocks of "
             f"{block_params(LLAMA3_70B) / 1e6:.0f}M weights, 141 GB in bf16. The arithmetic is checked on the "
             "smaller run: it predicts the reference's peak from it.", "",
             "| method | reference | predicted from | predicted → measured GiB | 70B peak RSS GiB (8 × 256 tokens) | "
             "70B peak RSS GiB (128 × 2048 tokens) | 70B s / block | 70B prune on this CPU | 70B on one GPU GiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for method in ("wanda", "sparsegpt"):
        rs = sorted((r for r in rows if r["method"] == method), key=lambda r: block_params(SHAPES[r["shape"]]))
        if len(rs) < 2:
            continue
        ref, small = rs[-1], max(rs[:-1], key=lambda r: r["blocks"])
        shape, gib = SHAPES[ref["shape"]], 2**30

        def peak(tok, target=LLAMA3_70B, source=ref):
            grow = block_bytes(target, method, tok) - block_bytes(SHAPES[source["shape"]], method, tokens)
            return (source["peak_rss_bytes"] + grow) / gib

        per_block = ref["seconds_per_block"] * block_work(LLAMA3_70B, method) / block_work(shape, method)
        hours = per_block * LLAMA3_70B[2] / 3600
        lines.append(f"| {method} | {ref['run']} | {small['run']} | "
                     f"{peak(tokens, shape, small):.2f} → {ref['peak_rss_bytes'] / gib:.2f} | {peak(tokens):.1f} | "
                     f"{peak(PAPERS_TOKENS):.1f} | {per_block:.0f} | {hours:.1f} h | "
                     f"{block_bytes(LLAMA3_70B, method, GPU_BATCH_TOKENS) / gib:.1f} |")
    lines += ["", "On one GPU only memory is calculated (no GPU was measured, so no GPU time is given): the card "
              "holds the block, one calibration batch of 8 × 2048 tokens and the method's work (`block_bytes`, "
              "without the CUDA context); the checkpoint, the output and the other batches stay in CPU memory "
              "and on disk.", ""]
    return lines


def plot(rows: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for method, marker in (("wanda", "o"), ("sparsegpt", "s")):
        rs = sorted((r for r in rows if r["method"] == method), key=lambda r: r["params"])
        if not rs:
            continue
        x = [r["params"] / 1e9 for r in rs]
        a.plot(x, [r["peak_rss_bytes"] / 2**30 for r in rs], marker=marker, label=method)
        b.plot(x, [r["prune_seconds"] for r in rs], marker=marker, label=method)
    a.set(xlabel="parameters (B)", ylabel="peak RSS (GiB)", title="memory")
    b.set(xlabel="parameters (B)", ylabel="prune seconds", title="time")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(benchmark_main(__file__, __doc__, RUNS, "scaling", one, markdown,
                            lambda r: f"{r['run']:>18}: {r['params'] / 1e9:.2f}B, peak {r['peak_rss_bytes'] / 2**30:.2f} "
                                      f"GiB, prune {r['prune_seconds']:.0f} s", plot))
