"""Several processes against one: the README's command on the built-in model, launched as 1 process x 1 thread,
1 x 2 and 2 processes x 1 thread (torchrun, gloo).

    python benchmarks/distributed.py                 # every run below (~15 min on 2 CPU cores)
    python benchmarks/distributed.py --runs wanda/1x2,wanda/2x1

Each run is the quick protocol through the command line (SmolLM2-135M, 32 x 512 calibration tokens of enwiki
train in batches of 8, perplexity on the first 16 x 1024-token windows of enwiki test), streamed:

    secateurs prune --method M --sparsity 0.5 --calib-samples 32 --calib-seqlen 512 --output OUT --threads T
    torchrun --standalone --nproc-per-node 2 -m secateurs prune ... --threads 1    # OMP_NUM_THREADS=1

and its saved weights are compared with those of the same method's one-process run with as many threads per
process (1 x 1): identical tensors, weights on the other side of the mask, largest difference.  Results go to
``benchmarks/results/distributed.{json,md}``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import benchmark_main

METHODS = ["magnitude", "wanda", "sparsegpt"]
LAYOUTS = {"1x1": (1, 1), "1x2": (1, 2), "2x1": (2, 1)}  # processes x threads each
RUNS = [f"{m}/{layout}" for m in METHODS for layout in LAYOUTS]


def scratch() -> Path:
    return Path(os.environ.get("SECATEURS_DISTRIBUTED_DIR", "/tmp/secateurs-distributed"))


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def one(run: str) -> dict:
    method, layout = run.split("/")
    processes, threads = LAYOUTS[layout]
    out, report = scratch() / f"out-{method}-{layout}", scratch() / f"report-{method}-{layout}.json"
    scratch().mkdir(parents=True, exist_ok=True)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)] \
        if processes > 1 else [sys.executable]
    cmd = [*launcher, "-m", "secateurs", "prune", "--method", method, "--sparsity", "0.5", "--calib-samples", "32",
           "--calib-seqlen", "512", "--output", str(out), "--overwrite", "--threads", str(threads), "--quiet",
           "--report", str(report)]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    wall = time.perf_counter() - t
    if proc.returncode:
        raise SystemExit(f"{run}: {proc.stderr.strip()[-2000:]}")
    r = json.loads(report.read_text())
    row = {"run": run, "method": method, "processes": processes, "threads": threads,
           "dense_perplexity": r["dense_perplexity"], "perplexity": r["perplexity"],
           "prune_seconds": r["prune_seconds"], "wall_seconds": round(wall, 1), "sparsity": r["sparsity"],
           "versions": r["versions"], "machine": r["machine"], "measured_at": r["measured_at"]}
    first = scratch() / f"out-{method}-{next(iter(LAYOUTS))}"
    if first != out and first.exists():
        a, b = _weights(first), _weights(out)
        row["compared_with"] = f"{method}/{next(iter(LAYOUTS))}"
        row["identical_tensors"] = f"{sum(bool((a[k] == b[k]).all()) for k in a)}/{len(a)}"
        row["mask_differences"] = int(sum(((a[k] == 0) != (b[k] == 0)).sum() for k in a))
        row["largest_difference"] = float(max((a[k].float() - b[k].float()).abs().max() for k in a))
    return row


def markdown(rows: list, command: str) -> str:
    from common import page_head

    lines = page_head("Several processes against one: the quick protocol through the command line", rows[0],
                      "\n\n".join(__doc__.split("\n\n")[2:5]).strip(), command)
    lines += ["| run | processes x threads | dense ppl | pruned ppl | prune s | wall s | identical tensors | "
              "mask differences | largest difference |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        same = (f"{r['identical_tensors']} | {r['mask_differences']} | {r['largest_difference']:.3g}"
                if "compared_with" in r else "(reference) | | ")
        lines.append(f"| {r['run']} | {r['processes']} x {r['threads']} | {r['dense_perplexity']:.4f} | "
                     f"{r['perplexity']:.4f} | {r['prune_seconds']:.1f} | {r['wall_seconds']:.0f} | {same} |")
    return "\n".join(lines + [""])


if __name__ == "__main__":
    sys.exit(benchmark_main(__file__, __doc__, RUNS, "distributed", one, markdown,
                            lambda r: f"{r['run']:>16}: ppl {r['perplexity']:.4f}, prune {r['prune_seconds']:.1f} s, "
                                      f"wall {r['wall_seconds']:.0f} s"))
