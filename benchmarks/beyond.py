"""Beyond the reference methods (issue 24), on the built-in model: OWL allocation, RIA, DSnoT and ALPS next to
dense, magnitude, Wanda and SparseGPT.

    python benchmarks/beyond.py          # 45 runs, ~1 h 50 min on 2 CPU cores

Quick protocol (shared/DATA.md; see quick_protocol.py). Magnitude, Wanda, SparseGPT and ALPS (its defaults:
rho 0.1, at most 300 ADMM iterations, 10 conjugate-gradient steps) at 50, 60, 70, 80 % unstructured, 2:4 and 4:8;
Wanda, SparseGPT and ALPS with OWL's allocation (``allocation=owl``, M = 5, lambda = 0.08: blocks with more
outliers keep more, the mean sparsity kept) at 60-80 % (ALPS at 70 and 80); SparseGPT with ADMM's re-fit of the
kept weights (``sparsegpt+admm``) at 70 % and 2:4; RIA (a = 0.5) at 60-80 % and 2:4, with its channel permutation
(``ria+permute``) at 2:4 and 4:8; Wanda with DSnoT's
mask refinement (``wanda+dsnot``: 50 swaps per row at most, threshold 0.1, the attention layers: the defaults
of the paper's code) at 60-80 % and 2:4.  Perplexity on
the protocol's windows and on the next 24 held-out windows; prune seconds and their ratio to one dense forward
over the calibration tokens (measured in the same process, after the prune).  Results go to
``benchmarks/results/beyond.{json,md}``.
"""

from __future__ import annotations

import sys

from common import dense_forward_seconds, held_out_main, held_out_markdown, prune_and_score, protocol_config, score

SETTINGS = ("0.5", "0.6", "0.7", "0.8", "2:4", "4:8")
RUNS = ["dense"] + [f"{m}:{s}/uniform" for m in ("magnitude", "wanda", "sparsegpt") for s in SETTINGS] + [
    f"{m}:{s}/owl" for m in ("wanda", "sparsegpt") for s in ("0.6", "0.7", "0.8")] + [
    f"sparsegpt+admm:{s}/uniform" for s in ("0.7", "2:4")] + [
    f"ria:{s}/uniform" for s in ("0.6", "0.7", "0.8", "2:4")] + [f"ria+permute:{s}/uniform" for s in ("2:4", "4:8")] + [
    f"wanda+dsnot:{s}/uniform" for s in ("0.6", "0.7", "0.8", "2:4")] + [
    f"alps:{s}/uniform" for s in SETTINGS] + [f"alps:{s}/owl" for s in ("0.7", "0.8")]


def one(run: str) -> dict:
    import torch

    from secateurs import calibration_data, load_model
    from secateurs.api import environment, parse_method

    if run == "dense":
        torch.set_num_threads(2)
        model, tok = load_model("smollm2-135m")
        return {"run": run, "method": "dense", "pattern": "-", "allocation": "-", "sparsity": 0.0,
                "prune_seconds": 0.0, "forwards": 0.0, **score(model, tok), **environment()}
    spec, allocation = run.split("/")
    name, setting = spec.split(":", 1)
    # "wanda+dsnot": method wanda with refine="dsnot"; "ria+permute": ria with its channel permutation
    method = {"method": "ria", "options": {"permute": True}} if name == "ria+permute" else parse_method(name)
    row = {"run": run, "allocation": allocation,
           **prune_and_score(method.pop("method"), setting, allocation=allocation, **method), "method": name}
    model, tok = load_model("smollm2-135m")
    row["dense_forward_seconds"] = round(dense_forward_seconds(model, calibration_data(tok, protocol_config(
        "wanda", setting))), 2)  # the calibration tokens do not depend on the method
    row["forwards"] = round(row["prune_seconds"] / row["dense_forward_seconds"], 2)
    return row


def markdown(rows: list[dict]) -> str:
    page = held_out_markdown(__file__, rows, "Beyond the reference methods: OWL, RIA, DSnoT, ALPS",
                             "`owl`: OWL's block sparsities (M 5, lambda 0.08); `wanda+dsnot`: Wanda's masks refined "
                             "by DSnoT in the attention layers (the default of the paper's code); "
                             "`sparsegpt+admm`: SparseGPT's weights re-fitted on its mask by ADMM. "
                             "`sparsity` is measured over every pruned layer (each row rounds down, so it lands up "
                             "to 0.002 under the target). The prune time includes OWL's walk of the dense model; "
                             "`x fwd` is the prune time over one dense forward of the calibration tokens in the same "
                             "process.",
                             "sparsity, allocation (x fwd)",
                             lambda r: f"{r['sparsity']:.4f}, {r['allocation']} ({r['forwards']:.1f})")
    return page + "\n" + "\n".join(other_machines(rows) + best_per_setting(rows)) + "\n"


def other_machines(rows: list[dict]) -> list[str]:
    """A note naming the rows measured on another CPU than the page's first row (their prune seconds are that
    machine's; ``x fwd`` divides by a dense forward timed in the same process, so it compares across them)."""
    cpu = rows[0]["machine"]["cpu"]
    other: dict[str, list[str]] = {}
    for r in rows:
        if r["machine"]["cpu"] != cpu:
            other.setdefault(r["machine"]["cpu"], []).append(r["run"])
    return [f"Measured on {name} instead: {', '.join(runs)} (prune seconds are that machine's; `x fwd` is timed "
            "against a dense forward in the same process)." for name, runs in other.items()] + ([""] if other else [])


def best_per_setting(rows: list[dict]) -> list[str]:
    """For each setting, the row with the lowest protocol perplexity against SparseGPT's (uniform) row."""
    lines = ["## Best per setting, against SparseGPT", "",
             "| setting | best | protocol ppl (SparseGPT) | change | held-out ppl (SparseGPT) | change | x fwd |",
             "|---|---|---|---|---|---|---|"]
    for setting in SETTINGS:
        same = [r for r in rows if r["run"].split(":", 1)[-1].split("/")[0] == setting]
        base = next((r for r in same if r["run"] == f"sparsegpt:{setting}/uniform"), None)
        if base is None:
            continue
        best = min(same, key=lambda r: r["perplexity"])
        name = best["method"] + (", owl" if best["allocation"] == "owl" else "")
        ppl, held = (best[k] / base[k] - 1 for k in ("perplexity", "held_out_perplexity"))
        lines.append(f"| {setting} | {name} | {best['perplexity']:.2f} ({base['perplexity']:.2f}) | {ppl:+.1%} | "
                     f"{best['held_out_perplexity']:.2f} ({base['held_out_perplexity']:.2f}) | {held:+.1%} | "
                     f"{best['forwards']:.1f} |")
    return lines


def main() -> int:
    return held_out_main(__file__, __doc__, RUNS, "beyond", one, markdown)


if __name__ == "__main__":
    sys.exit(main())
