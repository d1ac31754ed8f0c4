"""Recovery fine-tuning and gradual pruning on the built-in model, with perplexity curves.

    python benchmarks/recovery.py               # three runs, ~40 min on 2 CPU cores
    python benchmarks/recovery.py --steps 20 --runs wanda:2:4

Runs (each a fresh subprocess, the same training budget of ``--steps`` optimizer steps):

* ``wanda:2:4`` / ``wanda:0.5`` -- one-shot Wanda (quick-protocol calibration: 32 x 512 tokens of enwiki
  train, seed 0), then full-parameter recovery with the mask frozen;
* ``gradual:0.5`` -- gradual magnitude pruning from the dense model: cubic schedule 0 -> 50% over the first
  3/4 of the steps, mask updated every ``steps / 10`` steps, trained throughout.

Training: AdamW (lr 5e-5, no weight decay, 5 warm-up steps), windows of 128 tokens x 4 from enwiki train.txt
drawn from a seeded generator, fp32, 2 threads.  The curve evaluates the first 4 x 1024-token windows of
test.txt every ``--eval-every`` steps; the first and last points also use the quick protocol's 16 windows.
Results: ``benchmarks/results/recovery.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common import measured_on, run_each

HERE = Path(__file__).resolve().parent
RUNS = ["wanda:2:4", "wanda:0.5", "gradual:0.5"]
TRAIN = dict(batch_size=4, seqlen=128, lr=5e-5, weight_decay=0.0, warmup_steps=5, max_grad_norm=1.0)


def one(run: str, steps: int, eval_every: int) -> dict:
    import torch

    from secateurs import EvalConfig, PruneConfig, calibration_data, evaluate, load_model, prune
    from secateurs.api import environment
    from secateurs.data import load_text, tokenize
    from secateurs.eval import peak_rss_bytes
    from secateurs.training import TrainConfig, measured_sparsity, prunable_linears, train

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model, tok = load_model("smollm2-135m")
    test_ids = tokenize(tok, load_text("enwiki", "test"))
    train_ids = tokenize(tok, load_text("enwiki", "train"))
    curve_cfg, full_cfg = EvalConfig(windows=4), EvalConfig(windows=16)
    names = list(prunable_linears(model))
    row = {"run": run, "steps": steps, "train": TRAIN}
    kind, setting = run.split(":", 1)
    schedule = None
    if kind == "wanda":
        pattern = setting if ":" in setting else "unstructured"
        cfg = PruneConfig(method="wanda", pattern=pattern, sparsity=None if ":" in setting else float(setting),
                          calib_samples=32, calib_seqlen=512, seed=0)
        row["dense_perplexity"] = evaluate(model, tok, full_cfg, ids=test_ids, progress=False)
        result = prune(model, cfg, calibration_data(tok, cfg), progress=False)
        row["prune_seconds"] = result.prune_seconds
    elif kind == "gradual":
        schedule = dict(name="cubic", initial_sparsity=0.0, final_sparsity=float(setting), start_step=0,
                        end_step=(3 * steps) // 4, frequency=max(1, steps // 10))
    else:
        raise SystemExit(f"unknown run {run!r}")
    row["perplexity_start"] = evaluate(model, tok, full_cfg, ids=test_ids, progress=False)
    row["sparsity_start"] = measured_sparsity(model, names)
    config = TrainConfig(steps=steps, eval_every=eval_every, seed=0, schedule=schedule, **TRAIN)
    history = train(model, train_ids, config, evaluate=lambda m: evaluate(m, tok, curve_cfg, ids=test_ids,
                                                                          progress=False), progress=False)
    row["perplexity_end"] = evaluate(model, tok, full_cfg, ids=test_ids, progress=False)
    row["sparsity_end"] = measured_sparsity(model, names)
    row["history"] = history.to_dict()
    row["train_seconds"] = history.seconds
    row["peak_rss_bytes"] = peak_rss_bytes()
    row.update(environment())
    return row


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for r in rows:
        ev = r["history"]["evals"]
        ax1.plot([e["step"] for e in ev], [e["perplexity"] for e in ev], marker="o", ms=3, label=r["run"])
        loss = r["history"]["loss"]
        smooth = [sum(loss[max(0, i - 9) : i + 1]) / len(loss[max(0, i - 9) : i + 1]) for i in range(len(loss))]
        ax2.plot(r["history"]["steps"], smooth, label=r["run"])
    dense = next((r["dense_perplexity"] for r in rows if "dense_perplexity" in r), None)
    if dense:
        ax1.axhline(dense, color="grey", ls="--", lw=1, label=f"dense ({dense:.1f}, 16 windows)")
    ax1.set(yscale="log", xlabel="optimizer step", ylabel="perplexity (enwiki test, 4 x 1024)",
            title="SmolLM2-135M: recovery and gradual pruning")
    ax2.set(xlabel="optimizer step", ylabel="training loss (10-step mean)", title="training loss")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(rows: list[dict], command: str) -> str:
    env = rows[0]
    lines = [
        "# Recovery fine-tuning and gradual pruning (SmolLM2-135M)",
        "",
        f"{measured_on(env)} {rows[0]['steps']} optimizer steps per run, "
        f"{TRAIN['batch_size']} x {TRAIN['seqlen']} tokens each, AdamW lr {TRAIN['lr']}. Perplexity: first 16 x "
        "1024-token windows of enwiki test (the curve in recovery.png uses the first 4).",
        "",
        f"Reproduce: `{command}`",
        "",
        "| run | perplexity at start | after training | sparsity at start | at end | train s | peak RSS MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['run']} | {r['perplexity_start']:.2f} | {r['perplexity_end']:.2f} | "
                     f"{r['sparsity_start']:.4f} | {r['sparsity_end']:.4f} | {r['train_seconds']:.0f} | "
                     f"{r['peak_rss_bytes'] / 2**20:.0f} |")
    dense = next((r["dense_perplexity"] for r in rows if "dense_perplexity" in r), None)
    if dense:
        lines += ["", f"Dense perplexity: {dense:.2f}."]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default=",".join(RUNS))
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.steps, args.eval_every)))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/recovery.py" + (f" --steps {args.steps}" if args.steps != 120 else "") + (
        f" --runs {args.runs}" if args.runs != ",".join(RUNS) else "")

    def on_row(rows, seconds):
        r = rows[-1]
        print(f"{r['run']:>12}: perplexity {r['perplexity_start']:.2f} -> {r['perplexity_end']:.2f}, sparsity "
              f"{r['sparsity_end']:.4f} ({seconds:.0f} s)", flush=True)
        (out / "recovery.json").write_text(json.dumps(rows, indent=2) + "\n")  # nothing lost if a later run fails
        (out / "recovery.md").write_text(markdown(rows, command))

    rows = run_each(__file__, [r.strip() for r in args.runs.split(",") if r.strip()],
                    ["--steps", str(args.steps), "--eval-every", str(args.eval_every)], on_row)
    plot(rows, out / "recovery.png")
    print(markdown(rows, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
