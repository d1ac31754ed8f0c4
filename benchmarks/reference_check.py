"""Cross-check: the reference procedure written out plainly, and how far float rounding alone moves it.

    python benchmarks/reference_check.py          # 13 runs, ~30 min on 2 CPU cores

The reference figures in issue 2 come from the Wanda repository's one-shot loop (which also carries SparseGPT
and magnitude), adapted to CPU.  This script is a separate, deliberately plain implementation of that loop --
none of the product's engine, kernels or speed-ups -- so that a difference between the product and the
reference table can be told apart from a difference in the procedure:

* the first block's inputs are captured one calibration window at a time (batch 1), and every block is run one
  window at a time, observing all of its linears on the unpruned block (no true-sequential order), then again
  with the pruned weights to give the next block's inputs;
* statistics are means over windows: ``mean ||x_j||^2`` per input channel (Wanda) and ``H = 2/n sum X^T X``
  (SparseGPT);
* Wanda keeps, per output row, the weights with the largest ``|W_ij| * ||x_j||``; N:M groups are chosen with
  ``topk``;
* SparseGPT is the per-column OBS loop with no lazy sub-blocks, no stacking of layers that share an input, and
  ``U`` from Cholesky -> inverse -> Cholesky; the unstructured mask is chosen per 128-column block by the
  threshold rule ``score <= t``, ``t`` the value at rank ``floor(0.5 * numel)``;
* magnitude prunes, per layer, every weight with ``|w| <= t``, ``t`` the value at rank ``floor(0.5 * numel)``:
  weights tied with ``t`` go too, so the measured sparsity can exceed 0.5 (the built-in model's Q4_1 weights
  tie often).

Each Wanda and SparseGPT setting runs three times, with the statistics summed over windows in three ways that
are equal in exact arithmetic: ``reference`` (the reference code's running mean: rescale by ``n/(n+1)``, then
add the new window divided by ``n+1``), ``sum`` (add, divide once at the end) and ``float64`` (the running mean
in double precision).  The spread between them is the rounding noise of the procedure itself.

Perplexity is the protocol's (first 16 x 1024-token windows of enwiki test).  The product's figures are read
from ``results/quick_protocol.json`` (for SparseGPT its ``at once`` rows, the same order as here).  Results go
to ``benchmarks/results/reference_check.{json,md}``.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from common import benchmark_main, measured_on

ACCUMULATIONS = ("reference", "sum", "float64")
RUNS = ["magnitude:0.5"] + [f"{m}:{s}/{a}" for m in ("wanda", "sparsegpt") for s in ("0.5", "2:4") for a in ACCUMULATIONS]
ISSUE = {"magnitude:0.5": 371.5, "wanda:0.5": 40.81, "sparsegpt:0.5": 36.35, "wanda:2:4": 140.8,
         "sparsegpt:2:4": 67.16}


def threshold_mask(score, fraction: float):
    """``score <= t`` with ``t`` the ``floor(fraction * numel)``-th smallest score (ties at ``t`` included)."""
    import torch

    t = torch.sort(score.flatten())[0][int(score.numel() * fraction)]
    return score <= t


def nm_prune_mask(score, pruned: int, m: int):
    """In every ``m`` consecutive columns of each row, the ``pruned`` lowest scores (``topk``)."""
    import torch

    mask = torch.zeros_like(score, dtype=torch.bool)
    for c in range(0, score.shape[1], m):
        lowest = torch.topk(score[:, c:c + m], pruned, dim=1, largest=False).indices
        mask.scatter_(1, c + lowest, True)
    return mask


def wanda_mask(W, sq_norm, pattern):
    import torch

    score = W.abs() * sq_norm.sqrt().unsqueeze(0)
    if pattern is not None:
        return nm_prune_mask(score, *pattern)
    order = torch.sort(score, dim=1, stable=True).indices[:, : W.shape[1] // 2]
    return torch.zeros_like(score, dtype=torch.bool).scatter_(1, order, True)


def sparsegpt_weights(W, H, pattern, blocksize: int = 128, percdamp: float = 0.01):
    """The OBS loop, one column at a time; returns the pruned weights."""
    import torch

    W, H = W.clone(), H.clone()
    cols = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(cols)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    for b in range(0, cols, blocksize):
        e = min(b + blocksize, cols)
        Wb, Ub, errors = W[:, b:e].clone(), U[b:e, b:e], torch.zeros(W.shape[0], e - b)
        d = torch.diag(Ub)
        mask = torch.zeros_like(Wb, dtype=torch.bool)
        if pattern is None:
            mask = threshold_mask(Wb**2 / d.unsqueeze(0) ** 2, 0.5)
        for i in range(e - b):
            if pattern is not None and i % pattern[1] == 0:
                group = slice(i, i + pattern[1])
                mask[:, group] = nm_prune_mask(Wb[:, group] ** 2 / d[group].unsqueeze(0) ** 2, *pattern)
            kept = torch.where(mask[:, i], torch.zeros_like(Wb[:, i]), Wb[:, i])
            errors[:, i] = (Wb[:, i] - kept) / d[i]
            Wb[:, i:] -= errors[:, i:i + 1] @ Ub[i:i + 1, i:]
            Wb[:, i] = kept
        W[:, b:e] = Wb
        W[:, e:] -= errors @ U[b:e, e:]
    return W


def one(run: str) -> dict:
    import torch

    from secateurs import EvalConfig, PruneConfig, calibration_data, evaluate, load_model
    from secateurs.api import environment
    from secateurs.data import load_text, tokenize

    torch.set_num_threads(2)
    torch.manual_seed(0)
    spec, _, accumulation = run.partition("/")
    method, setting = spec.split(":", 1)
    pattern = None
    if ":" in setting:  # ours N:M keeps N of M; the reference loop counts the pruned ones
        kept, m = map(int, setting.split(":"))
        pattern = (m - kept, m)
    model, tok = load_model("smollm2-135m")
    calib = calibration_data(tok, PruneConfig(method="wanda", calib_samples=32, calib_seqlen=512, seed=0))
    blocks = model.model.layers  # the reference loop is written for Llama-style models
    linears = [m for block in blocks for m in block.modules() if isinstance(m, torch.nn.Linear)]

    with torch.no_grad():
        if method == "magnitude":
            for lin in linears:
                lin.weight[threshold_mask(lin.weight.abs(), 0.5)] = 0
        else:
            inputs, kwargs = capture_first_block_inputs(model, blocks, calib)
            for block in blocks:
                stats = observe(block, inputs, kwargs, accumulation)
                for lin, (sq_norm, H) in stats.items():
                    if method == "wanda":
                        lin.weight[wanda_mask(lin.weight, sq_norm, pattern)] = 0
                    else:
                        lin.weight.copy_(sparsegpt_weights(lin.weight, H, pattern))
                inputs = [first(block(x, **kwargs)) for x in inputs]

    zeros = sum(int((lin.weight == 0).sum()) for lin in linears)
    total = sum(lin.weight.numel() for lin in linears)
    ppl = evaluate(model, tok, EvalConfig(seqlen=1024, windows=16),
                   ids=tokenize(tok, load_text("enwiki", "test")), progress=False)
    return {"run": run, "method": method, "setting": setting, "accumulation": accumulation or None,
            "replica_perplexity": ppl,
            "replica_sparsity": zeros / total, **environment()}


def first(output):
    return output[0] if isinstance(output, tuple) else output


def capture_first_block_inputs(model, blocks, calib):
    """Run each window alone until the first block; keep its hidden states and the block's keyword args."""
    inputs, kwargs = [], {}

    class Stop(Exception):
        pass

    def grab(_module, args, kw):
        inputs.append(args[0] if args else kw["hidden_states"])
        kwargs.update({k: v for k, v in kw.items() if k != "hidden_states"})
        raise Stop

    handle = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for j in range(calib.shape[0]):
            try:
                model(calib[j:j + 1], use_cache=False)
            except Stop:
                pass
    finally:
        handle.remove()
    kwargs.pop("past_key_values", None)
    kwargs.pop("past_key_value", None)
    return inputs, kwargs


def observe(block, inputs, kwargs, accumulation: str) -> dict:
    """Per linear, over windows: ``mean ||x_j||^2`` and ``H = 2/n sum X^T X``, summed the ``accumulation`` way."""
    import torch

    dtype = torch.float64 if accumulation == "float64" else torch.float32
    sums, count = {}, {}

    def hook(lin, args):
        x = args[0].reshape(-1, args[0].shape[-1]).t().to(dtype)  # (in, tokens)
        sq_norm, H = sums.get(lin, (torch.zeros(x.shape[0], dtype=dtype), torch.zeros(x.shape[0], x.shape[0], dtype=dtype)))
        n = count[lin] = count.get(lin, 0) + 1
        if accumulation == "sum":
            sq_norm, H = sq_norm + x.norm(dim=1) ** 2, H + x @ x.t()
        else:  # the reference code's running mean
            sq_norm, H = sq_norm * ((n - 1) / n), H * ((n - 1) / n)
            x_scaled = math.sqrt(2 / n) * x
            sq_norm, H = sq_norm + x.norm(dim=1) ** 2 / n, H + x_scaled @ x_scaled.t()
        sums[lin] = (sq_norm, H)

    handles = [m.register_forward_pre_hook(hook) for m in block.modules() if isinstance(m, torch.nn.Linear)]
    try:
        for x in inputs:
            block(x, **kwargs)
    finally:
        for h in handles:
            h.remove()
    if accumulation == "sum":
        return {lin: (sq_norm / count[lin], H * (2 / count[lin])) for lin, (sq_norm, H) in sums.items()}
    return {lin: (sq_norm.float(), H.float()) for lin, (sq_norm, H) in sums.items()}


def product_rows() -> dict:
    rows = json.loads((Path(__file__).parent / "results" / "quick_protocol.json").read_text())
    out = {}
    for r in rows:
        if r["run"] == "dense":
            continue
        spec, _, variant = r["run"].partition("/")
        if r["method"].startswith("sparsegpt") and variant != "at-once":
            continue  # the replica observes a block at once, so compare with the product's at-once rows
        out[spec] = r["perplexity"]
    return out


def markdown(rows: list[dict], command: str) -> str:
    product = product_rows()
    lines = ["# Cross-check: the reference procedure written out plainly", "", measured_on(rows[0]), "",
             "Quick protocol (shared/DATA.md). `replica` = `benchmarks/reference_check.py`, an independent plain "
             "implementation of the reference loop (one window per forward, at once, column-by-column OBS, `topk` "
             "for N:M, magnitude by `|w| <= t`), with its statistics summed over windows three ways that are equal "
             "in exact arithmetic (`reference` running mean, `sum` then divide, `float64`); `spread` = largest / "
             "smallest - 1. `product` = the product on the same protocol (`results/quick_protocol.json`; "
             "SparseGPT: its at-once rows); `issue 2` = the reference table in the issue.", "",
             f"Reproduce: `{command}`", "",
             "| method | pattern | replica: reference | sum | float64 | spread | replica sparsity | product | "
             "issue 2 |", "|---|---|---|---|---|---|---|---|---|"]
    groups: dict = {}
    for r in rows:
        groups.setdefault(f"{r['method']}:{r['setting']}", []).append(r)
    for spec, group in groups.items():
        method, setting = spec.split(":", 1)
        by = {r["accumulation"]: r["replica_perplexity"] for r in group}
        if None in by:  # magnitude gathers no statistics: one run
            cells = [f"{by[None]:.2f} (no statistics)", "–", "–"]
        else:
            cells = [f"{by[a]:.2f}" if a in by else "–" for a in ACCUMULATIONS]
        values = list(by.values())
        spread = f"{max(values) / min(values) - 1:.1%}" if len(values) > 1 else "–"
        issue = f"{ISSUE[spec]:.2f}" if spec in ISSUE else "–"
        lines.append(f"| {method} | {'unstructured' if ':' not in setting else setting} | {' | '.join(cells)} | "
                     f"{spread} | {group[0]['replica_sparsity']:.4f} | {product[spec]:.2f} | {issue} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    return benchmark_main(__file__, __doc__, RUNS, "reference_check", one, markdown,
                          lambda r: f"{r['run']}: replica {r['replica_perplexity']:.3f}, "
                                    f"sparsity {r['replica_sparsity']:.4f}")


if __name__ == "__main__":
    sys.exit(main())
