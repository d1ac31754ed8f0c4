"""Prune transformers and measure what it cost: prune, eval, compare, sweep, sensitivity, finetune, iterate,
decompress, export.

Every error a user can cause (bad sparsity, pattern, path, data...) ends in one line on stderr and exit
status 2; nothing is written to the output folder unless the whole run succeeded.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

from . import atomic
from .errors import ConfigError
from .config import REFINE, ROLES, STRUCTURED
from .engine.distributed import current as current_ranks, launched, lost_a_rank, stop as stop_ranks
from .methods import METHODS
from .methods.base import option_table
from .models.load import DEFAULT_MODEL, DTYPES

EXIT_USAGE = 2


def _add_model(p):
    p.add_argument("--model", default=None, help="hub id, local folder, .gguf file or built-in name "
                   f"(default: {DEFAULT_MODEL})")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--dtype", choices=list(DTYPES), default="auto",
                   help="the model's dtype in memory and on disk (default auto: the checkpoint's own). Statistics "
                        "and each method's math run in float32 whatever it is; float16 forwards on a CPU are slow")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_no_stream(p, what):
    p.add_argument("--no-stream", action="store_true",
                   help="load the whole model instead of streaming its blocks from its safetensors files (streaming "
                        f"is the default for {what})")


def _add_eval(p, data_flag="--eval-data"):
    p.add_argument(data_flag, dest="eval_data", default=None, help="evaluation data (test split): enwiki, "
                   "a .txt/.jsonl file or a datasets name (default: enwiki); accuracy: labelled .jsonl/.csv")
    p.add_argument("--metric", choices=["perplexity", "accuracy", "pseudo-perplexity"], default=None,
                   help="default: the model's own: perplexity (causal LM), accuracy (sequence classifier, labelled "
                        "data), pseudo-perplexity (masked LM)")
    p.add_argument("--eval-seqlen", type=int, default=None, help="tokens per window (default 1024)")
    p.add_argument("--eval-windows", type=int, default=None, help="number of windows; 0 = the whole split (default 16)")
    p.add_argument("--eval-stride", type=int, default=None, help="window stride (default: seqlen, no overlap)")


def _add_prune(p, single_method=True):
    if single_method:
        p.add_argument("--method", default=None, help=f"{' | '.join(METHODS)} (weights, default wanda); "
                       f"{' | '.join(STRUCTURED)} (structured)")
        p.add_argument("--sparsity", type=float, default=None, help="fraction of weights removed (default 0.5; "
                       "implied by N:M)")
        p.add_argument("--pattern", default=None, help="unstructured | N:M (N kept of every M) | block:B")
        p.add_argument("--group", default=None, help="which scores compete: row | layer (sparsegpt: lazy-batch)")
        p.add_argument("--layer-sparsity", action="append", default=None, metavar="REGEX=S",
                       help="per-layer override, repeatable: 'mlp=0.6', 'blocks:0-4=0.3'")
        p.add_argument("--recipe", default=None, help="YAML/JSON recipe (flags override its top level)")
        s = p.add_argument_group("structured methods (channels, heads, blocks, experts, slicegpt)")
        s.add_argument("--slice", type=float, default=None, metavar="F",
                       help="slicegpt: fraction of the hidden width (the residual stream) to delete")
        s.add_argument("--ratio", type=float, default=None, help="fraction of each layer's channels / heads / "
                       "experts (of all of them with --allocation global), or of the blocks, to remove")
        s.add_argument("--remove-per-layer", type=int, default=None, metavar="N",
                       help="channels (heads: head units; experts: experts) removed in every block")
        s.add_argument("--remove-blocks", type=int, default=None, metavar="K", help="blocks: remove K whole blocks")
        s.add_argument("--score", default=None, help="channels/heads: magnitude | wanda | fluctuation (default); "
                       "blocks: bi (default) | angular; experts: reap (default) | frequency")
        s.add_argument("--round-to", type=int, default=None, help="kept channels per layer: a multiple of this")
        s.add_argument("--gqa", default=None, help="heads: per-group (default) | kv-groups")
        s.add_argument("--rotation", default=None, help="slicegpt: shared (default: one rotation, loads in plain "
                       "transformers) | per-block (the paper's: shortcut matrices, loads with secateurs)")
        s.add_argument("--refit", action="store_true", default=None,
                       help="least-squares refit of the output projection on calibration activations")
        s.add_argument("--bias-compensation", action=argparse.BooleanOptionalAction, default=None,
                       help="fold removed channels' mean output into the bias (default: with fluctuation)")
        s.add_argument("--no-speed", action="store_true",
                       help="structured: skip measuring disk size and CPU speed (dense vs pruned)")
    p.add_argument("--include", action="append", default=None, help="attention | mlp | all | encoder (every block "
                   "linear, everything but a task head: the same as all) | REGEX (repeatable)")
    p.add_argument("--exclude", action="append", default=None, help="REGEX of layers to keep dense (repeatable)")
    p.add_argument("--calib-data", default=None, help="calibration data (train split); default enwiki")
    p.add_argument("--calib-samples", type=int, default=None, help="calibration windows (default 128)")
    p.add_argument("--calib-seqlen", type=int, default=None, help="tokens per window (default 2048)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="calibration samples per block forward (default 8)")
    p.add_argument("--allocation", default=None, help="how the sparsity is spread over layers: uniform (default; "
                   "structured: the same width everywhere, a plain HF config) | global (one ranking of all layers) | "
                   "owl (weights: blocks with more outliers keep more, the mean kept)")
    p.add_argument("--owl-m", type=float, default=None, help="owl: outlier = score above M x the block's mean "
                   "(default 5)")
    p.add_argument("--owl-lambda", type=float, default=None, help="owl: the blocks' sparsities span at most 2 "
                   "lambda (default 0.08)")
    _add_method_options(p)
    p.add_argument("--refine", choices=list(REFINE), default=None,
                   help="after masking: re-fit the kept weights to the dense layer's outputs (admm), or swap "
                        "weights in and out of each row's mask to keep its expected output (dsnot); default none")
    p.add_argument("--refine-iters", type=int, default=None, help="admm iterations (default 20); dsnot: most "
                   "swaps per row (default 50)")
    p.add_argument("--refine-damp", type=float, default=None, help="admm damping per channel (default 0.1)")
    p.add_argument("--refine-threshold", type=float, default=None, help="dsnot: a row stops once its expected "
                   "output error, summed over a calibration sequence, is at most this (default 0.1)")
    p.add_argument("--refine-scope", choices=list(ROLES), default=None, help="dsnot: the layers it refines "
                   "(default attention, as the paper's code)")
    p.add_argument("--propagate", choices=["pruned", "dense"], default=None,
                   help="next block sees pruned (default) or dense outputs")
    p.add_argument("--true-sequential", action=argparse.BooleanOptionalAction, default=None,
                   help="prune a block's input groups one at a time, each observed after the previous one was "
                        "pruned (default: on for sparsegpt, off for wanda)")
    p.add_argument("--device", default=None, help="compute device for each block (default cpu)")
    p.add_argument("--quant", choices=["none", "int8", "int4"], default=None,
                   help="the kept weights as integers with group-wise scales (default none; needs --save-format "
                        "sparse). Round to nearest; sparsegpt quantizes inside its sweep (--no-joint-quant: not)")
    p.add_argument("--group-size", type=int, default=None, help="quant: input columns sharing one scale (default 128)")
    p.add_argument("--allow-partial", action="store_true", default=None,
                   help="prune even where much of the scope is weights secateurs cannot prune yet (a mixture of "
                        "experts' fused experts); they are named, and the reported sparsity counts them")


def _add_method_options(p):
    """One flag per method option (``--percdamp``), derived from the registry: a new method needs no edit here."""

    g = p.add_argument_group("method options")
    for name, option in option_table().items():
        owners = " and ".join(m for m, c in METHODS.items() if name in c.options())
        kind = {"type": option.type} if option.type is not bool else {"action": argparse.BooleanOptionalAction}
        g.add_argument("--" + name.replace("_", "-"), default=None, **kind, help=f"{owners}: {option.help}")


def _add_tasks(p, instead: str = ""):
    t = p.add_argument_group("zero-shot accuracy (lm-eval-harness: pip install 'secateurs[eval]')")
    t.add_argument("--tasks", default=None, help="comma list of lm-eval task names (hellaswag, arc_easy, piqa, ...)"
                   + (f"; replaces {instead}" if instead else ""))
    t.add_argument("--include-path", default=None, metavar="DIR", help="a folder of extra task YAMLs")
    t.add_argument("--limit", type=int, default=None, metavar="N", help="at most N examples of each task")


def _zero_shot(args):
    """--tasks/--include-path/--limit as a ZeroShot, or None without --tasks."""
    from .eval.tasks import ZeroShot

    if args.tasks is None:
        if args.include_path is not None or args.limit is not None:
            raise ConfigError("--include-path and --limit shape --tasks: name the tasks")
        return None
    return ZeroShot([t.strip() for t in args.tasks.split(",") if t.strip()], args.include_path, args.limit)


def _say_zero_shot(scores: dict, before: "dict | None" = None) -> None:
    from .eval.tasks import headline

    old = headline(before or {})
    for task, (metric, value, stderr) in headline(scores).items():
        was = f" (dense {old[task][1]:.4f})" if task in old else ""
        print(f"{task} {metric}: {value:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else "") + was, flush=True)


def _add_output(p, what: str):
    p.add_argument("--output", required=True, help=f"folder for {what} (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--report", default=None, help="write the JSON report here (also saved in the output folder)")


def _add_train(p, steps_flag="--steps", required=True):
    t = p.add_argument_group("training")
    t.add_argument(steps_flag, dest="steps", type=int, required=required, help="optimizer steps")
    t.add_argument("--train-batch-size", type=int, default=None, help="windows per micro-batch (default 4)")
    t.add_argument("--train-seqlen", type=int, default=None, help="tokens per training window (default 256)")
    t.add_argument("--grad-accum", type=int, default=None, help="micro-batches per optimizer step (default 1)")
    t.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default 2e-5)")
    t.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay (default 0)")
    t.add_argument("--warmup-steps", type=int, default=None)
    t.add_argument("--max-grad-norm", type=float, default=None, help="gradient clipping (default 1.0)")
    t.add_argument("--precision", default=None, help="fp32 (default) | bf16 (autocast)")
    t.add_argument("--lora-rank", type=int, default=None, help="train masked LoRA adapters of this rank (0 = full)")
    t.add_argument("--lora-alpha", type=float, default=None)
    t.add_argument("--eval-every", type=int, default=None, help="evaluate every N steps (default: start and end)")
    t.add_argument("--train-seed", type=int, default=None)


def _add_schedule(p):
    s = p.add_argument_group("gradual pruning while training (omit --schedule to keep the mask frozen)")
    s.add_argument("--schedule", default=None, help="oneshot | gradual | cubic | exponential | geometric")
    s.add_argument("--final-sparsity", type=float, default=None)
    s.add_argument("--initial-sparsity", type=float, default=None)
    s.add_argument("--start-step", type=int, default=None)
    s.add_argument("--end-step", type=int, default=None, help="default: 3/4 of --steps")
    s.add_argument("--frequency", type=int, default=None, help="update the mask every N steps (default 1)")
    s.add_argument("--k", type=float, default=None, help="exponential: steepness (default 5)")
    s.add_argument("--pattern", default=None, help="unstructured (default) | block:B")
    s.add_argument("--group", default=None, help="layer (default) | row")


_TRAIN_FIELDS = {"steps": "steps", "train_batch_size": "batch_size", "train_seqlen": "seqlen",
                 "grad_accum": "grad_accum", "lr": "lr", "weight_decay": "weight_decay",
                 "warmup_steps": "warmup_steps", "max_grad_norm": "max_grad_norm", "precision": "precision",
                 "lora_rank": "lora_rank", "lora_alpha": "lora_alpha", "eval_every": "eval_every",
                 "train_seed": "seed"}


_SCHEDULE_FLAGS = ("final_sparsity", "initial_sparsity", "start_step", "end_step", "frequency", "k")


def _train_config(args):
    """The TrainConfig the flags give; gradual-pruning flags go into its schedule (which checks them)."""
    from .training import TrainConfig

    fields = {dst: getattr(args, src) for src, dst in _TRAIN_FIELDS.items() if getattr(args, src, None) is not None}
    if not hasattr(args, "end_step"):  # iterate: no schedule flags
        return TrainConfig(**fields)
    given = {k: getattr(args, k) for k in (*_SCHEDULE_FLAGS, "pattern", "group") if getattr(args, k) is not None}
    if given and not args.schedule:
        raise ConfigError(f"{_flag_names(given)} need(s) --schedule (without one the mask stays frozen)")
    if args.schedule:
        fields["schedule"] = {"name": args.schedule, **{k: v for k, v in given.items() if k in _SCHEDULE_FLAGS}}
    return TrainConfig(**fields, **{k: v for k, v in given.items() if k in ("pattern", "group")})


def _flag_names(keys) -> str:
    return ", ".join("--" + k.replace("_", "-") for k in keys)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


class _Parser(argparse.ArgumentParser):
    """Argument errors (a bad choice, a value that is not a number) read like every other error: one line
    ``secateurs: error: ...`` and exit status 2, without argparse's usage block; ``--help`` still has it."""

    def error(self, message):
        command = self.prog.partition(" ")[2]  # "prune" for `secateurs prune`, "" for the top level
        self.exit(EXIT_USAGE, f"secateurs: error: {command + ': ' if command else ''}{message}\n")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="secateurs", description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--version", action="version", version=f"secateurs {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prune", help="prune a model, measure perplexity, save it")
    _add_model(p)
    _add_prune(p)
    _add_eval(p)
    p.add_argument("--no-eval", action="store_true", help="skip the perplexity measurements")
    _add_tasks(p)
    _add_output(p, "the pruned model")
    p.add_argument("--save-every", type=_positive_int, default=None, metavar="N",
                   help="save the walk's state to OUTPUT.prune-state every N blocks; the same command resumes from it")
    p.add_argument("--no-resume", action="store_true", help="start the walk over even if OUTPUT.prune-state exists")
    p.add_argument("--save-format", choices=["dense", "sparse"], default="dense",
                   help="dense (default): what plain transformers loads; sparse: each pruned weight stored as its "
                        "kept values and where they are (docs/format.md), read by every secateurs command")
    _add_no_stream(p, "every method without --allocation global")

    p = sub.add_parser("finetune", help="recovery fine-tuning with the mask frozen (or gradual pruning on a schedule)")
    _add_model(p)
    p.add_argument("--data", default=None, help="training text (its train split): enwiki (default), .txt, .jsonl, "
                   "datasets; --task classification: labelled examples, .jsonl/.csv with text and label")
    p.add_argument("--task", choices=["lm", "classification"], default="lm",
                   help="lm (default): causal language modelling; classification: an encoder's sequence "
                        "classifier (a bare encoder or masked LM gets a new head for the data's classes), measured "
                        "by accuracy on --eval-data")
    p.add_argument("--epochs", type=float, default=None, help="classification: passes over the training examples "
                   "(instead of --steps)")
    _add_train(p, required=False)
    _add_schedule(p)
    _add_eval(p)
    _add_output(p, "the trained model")
    p.add_argument("--save-every", type=int, default=0,
                   help="save the training state to OUTPUT.train-state.pt every N steps (default 0: never)")
    p.add_argument("--no-resume", action="store_true", help="start from step 0 even if OUTPUT.train-state.pt exists")

    p = sub.add_parser("iterate", help="iterative prune-retrain cycles with a checkpoint after each")
    _add_model(p)
    p.add_argument("--method", default=None, help=f"{' | '.join(METHODS)} (default: wanda)")
    p.add_argument("--pattern", default=None, help="unstructured | N:M | block:B")
    p.add_argument("--group", default=None, help="which scores compete: row | layer (sparsegpt: lazy-batch)")
    _add_prune(p, single_method=False)
    p.add_argument("--sparsities", default=None, help="comma list of per-cycle targets, e.g. 0.3,0.45,0.5")
    p.add_argument("--cycles", type=int, default=None, help="number of cycles (with --final-sparsity)")
    p.add_argument("--final-sparsity", type=float, default=None)
    p.add_argument("--initial-sparsity", type=float, default=None, help="first cycle's target")
    p.add_argument("--cycle-schedule", default=None, help="geometric (default) | gradual | cubic | exponential")
    p.add_argument("--train-data", default=None, help="retraining text (train split; default enwiki)")
    _add_train(p, steps_flag="--steps-per-cycle")
    _add_eval(p)
    p.add_argument("--output", required=True, help="folder for cycle-NNN checkpoints and history.json")
    p.add_argument("--no-resume", action="store_true", help="start from cycle 1 even if checkpoints exist")

    p = sub.add_parser("eval", help="perplexity of a model (and zero-shot accuracy with --tasks)")
    _add_model(p)
    _add_eval(p, "--data")
    _add_tasks(p)
    _add_no_stream(p, "a safetensors model")
    p.add_argument("--report", default=None, help="write the JSON result here")

    p = sub.add_parser("compare", help="dense + every method x sparsity: the researcher's table")
    _add_model(p)
    p.add_argument("--methods", default="magnitude,wanda,sparsegpt",
                   help="comma list of methods; METHOD+admm adds weight reconstruction to that row")
    p.add_argument("--sparsities", default="0.5,2:4,4:8", help="comma list of 0.5 (unstructured), N:M, block:B@S")
    _add_prune(p, single_method=False)
    _add_eval(p)
    p.add_argument("--report", default=None, help="write the JSON table here (rewritten after every cell)")
    p.add_argument("--markdown", default=None, help="write the markdown table here (rewritten after every cell)")
    p.add_argument("--resume", action="store_true",
                   help="keep the cells already in --report (from an interrupted run) and measure only the rest")
    _add_tasks(p)
    _add_no_stream(p, "weight-pruning cells without --allocation global; each cell's model is written to a "
                      "temporary folder (TMPDIR) and removed once measured")

    p = sub.add_parser("sweep", help="a grid of pruning runs from a YAML file: results.json, results.csv and "
                       "report.html with plots; resumable")
    p.add_argument("grid", help="the grid file (YAML or JSON; see docs/sweeps.md, examples/sweep-quick.yaml)")
    p.add_argument("--output", required=True, help="folder for results.json, results.csv, report.html and plots/; "
                   "a folder holding part of the same sweep is resumed")
    _add_model(p)
    _add_tasks(p, "the grid's zero_shot")

    p = sub.add_parser("sensitivity", help="prune one block (or one block's attention or MLP) at a time and "
                       "report the perplexity change")
    _add_model(p)
    p.add_argument("--method", default=None, help=f"{' | '.join(METHODS)} (default wanda)")
    p.add_argument("--sparsity", type=float, default=None, help="of the block pruned (default 0.5)")
    p.add_argument("--pattern", default=None, help="unstructured | N:M | block:B")
    p.add_argument("--by", choices=["block", "role"], default="block",
                   help="block: one cell per block; role: its attention and its MLP apart")
    _add_prune(p, single_method=False)
    _add_eval(p)
    _add_tasks(p)
    p.add_argument("--output", required=True, help="folder for results.json, results.csv and report.html (resumed "
                   "when it holds part of the same run)")

    p = sub.add_parser("decompress", help="write the plain dense checkpoint of a compressed sparse one")
    p.add_argument("input", help="a folder saved with --save-format sparse")
    p.add_argument("output", help="folder for the dense checkpoint (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--quiet", action="store_true", help="no progress messages")

    p = sub.add_parser("export", help="write a saved model as one GGUF file (llama.cpp, Ollama, LM Studio)")
    p.add_argument("input", help="a model folder (dense or compressed; llama or qwen2, one width for all blocks)")
    p.add_argument("--gguf", required=True, metavar="OUT.gguf", help="the GGUF file to write (atomically)")
    p.add_argument("--quant", choices=["f16", "q8_0", "q4_0"], default="f16",
                   help="the 2-D weights' type (default f16); norms and biases stay float32")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")
    p.add_argument("--quiet", action="store_true", help="no progress messages")
    return parser


_FLAG_FIELDS = ["method", "sparsity", "pattern", "group", "include", "exclude", "calib_data", "calib_samples",
                "calib_seqlen", "seed", "batch_size", "refine", "refine_iters", "refine_damp", "refine_threshold",
                "refine_scope", "propagate", "true_sequential", "device", "ratio", "score", "allocation", "round_to",
                "gqa", "rotation", "refit", "bias_compensation", "quant", "group_size", "allow_partial", "owl_m", "owl_lambda"]


def _overrides(args) -> dict:
    """The config fields given as flags (a method's options among them, as top-level keys)."""
    out = {k: getattr(args, k) for k in [*_FLAG_FIELDS, *option_table()] if getattr(args, k, None) is not None}
    if getattr(args, "layer_sparsity", None):
        out["layer_sparsity"] = args.layer_sparsity
    per_layer, blocks = getattr(args, "remove_per_layer", None), getattr(args, "remove_blocks", None)
    if per_layer is not None and blocks is not None:
        raise ConfigError("give --remove-per-layer (channels, heads) or --remove-blocks (blocks), not both")
    if getattr(args, "slice", None) is not None:
        if out.get("method", "slicegpt") != "slicegpt" or "ratio" in out:
            raise ConfigError("--slice is the width fraction of --method slicegpt (without --ratio)")
        out["method"], out["ratio"] = "slicegpt", args.slice
    if blocks is not None:
        if out.get("method", "blocks") != "blocks":
            raise ConfigError(f"--remove-blocks is for --method blocks, not {out['method']}")
        out["method"] = "blocks"
        out["count"] = blocks
    elif per_layer is not None:
        out["count"] = per_layer
    return out


def _eval_config(args, base=None):
    """Evaluation settings: command-line flags over the recipe's ``eval`` section over the defaults."""
    from dataclasses import replace

    from .config import EvalConfig

    flags = {"data": args.eval_data, "seqlen": args.eval_seqlen, "stride": args.eval_stride, "metric": args.metric}
    changes = {k: v for k, v in flags.items() if v is not None}
    if args.eval_windows is not None:
        changes["windows"] = args.eval_windows or None
    return replace(base or EvalConfig(), **changes)


def _load(args):
    import torch

    from .models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    return load_model(args.model, args.dtype)


def _threads(args) -> None:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)


def _dtype(args):
    """--dtype as a torch dtype; None for auto (the checkpoint's own)."""
    from .models.load import as_dtype

    dtype = as_dtype(args.dtype)
    return None if dtype == "auto" else dtype


def cmd_prune(args) -> int:
    from . import api
    from .config import ConfigError, Recipe, StructuredConfig, config_from_dict
    from .data import load_text, tokenize
    from .eval import speed
    from .export.compressed import check_format, compressible, storage_of
    from .models import check_output, check_space, save_model
    from .models.snapshot import weight_bytes
    from .progress import Stage, Tracker

    overrides = _overrides(args)
    recipe = Recipe.load(args.recipe, overrides) if args.recipe else Recipe([config_from_dict(overrides)])
    recipe.eval = _eval_config(args, recipe.eval)
    eval_config = None if args.no_eval else recipe.eval
    check_format(args.save_format, recipe.stages)
    output = check_output(args.output, args.overwrite)
    tasks = _zero_shot(args)
    manager = tasks.task_manager() if tasks else None  # unknown task names refused before any work
    # lm-eval scores the model in memory: with --tasks it is loaded whole
    source = None if args.no_stream or tasks else api.stream_source(args.model, recipe)
    checkpoint = api.walk_checkpoint(recipe, args.output, {"model": args.model or DEFAULT_MODEL}, args.save_every,
                                     resume=not args.no_resume, streamed=source is not None)
    if source is not None:
        return _prune_streamed(args, recipe, source, eval_config, checkpoint)

    model, tokenizer = _load(args)
    show = not args.quiet
    eval_ids = calib = None
    from .eval.encoders import metric_of

    if eval_config and metric_of(model, eval_config.metric) != "accuracy":  # accuracy reads labelled examples
        eval_ids = tokenize(tokenizer, load_text(eval_config.data, "test"))
    first = recipe.stages[0]
    if any(c.needs_calibration for c in recipe.stages):
        calib = api.calibration_data(tokenizer, first, model=model)
    api.validate(model, recipe, calib)  # a bad rule or length fails now, not after the dense evaluation
    structured = any(isinstance(c, StructuredConfig) for c in recipe.stages)
    if not structured:  # zeros take the room of the weights they replace (a structured cut saves less)
        room, what = api.walk_room(model, first, checkpoint)
        if args.save_format == "sparse":  # the dense files are written first, then re-stored one at a time
            room += weight_bytes(model)
        check_space(output, model, extra=16 * 2**20 + room, what=what)
    metric = metric_of(model, eval_config.metric) if eval_config else None
    dense = api.evaluate(model, tokenizer, eval_config, ids=eval_ids, progress=show) if eval_config else None
    if dense is not None:
        print(f"dense {metric}: {dense:.4f}" if metric != "perplexity" else f"dense perplexity: {dense:.3f}",
              flush=True)
    if tasks:
        from .eval.tasks import zero_shot

        dense_scores = zero_shot(model, tokenizer, tasks, manager, progress=show)
        _say_zero_shot(dense_scores)

    from .models.arch import head_of

    # speed is a causal LM's prefill and decoding: an encoder decodes nothing
    dense_size_speed = speed.size_and_speed(model) if structured and not args.no_speed and \
        head_of(model) == "causal" else None

    tracker = Tracker(show=show)
    result = api.prune(model, recipe, calib, tracker=tracker, checkpoint=checkpoint)
    _say_pruned(result, sum(p.numel() for p in model.parameters()))
    if structured:  # the cut model's size is known now: check before its evaluation and speed measurement
        check_space(output, model)
    ppl = None
    if eval_config:
        tracker.enter(Stage.EVALUATING)
        ppl = api.evaluate(model, tokenizer, eval_config, ids=eval_ids, progress=show)
        digits = 3 if metric == "perplexity" else 4
        print(f"pruned {metric}: {ppl:.{digits}f}" + (f" (dense {dense:.{digits}f})" if dense is not None else ""),
              flush=True)
    scores = None
    if tasks:
        tracker.enter(Stage.EVALUATING)
        scores = {"dense": dense_scores, "pruned": zero_shot(model, tokenizer, tasks, manager, progress=show),
                  "tasks": tasks.to_dict()}
        _say_zero_shot(scores["pruned"], dense_scores)
    tracker.enter(Stage.EXPORTING)
    t = time.perf_counter()
    measured = {} if metric in (None, "perplexity") else {"metric": metric, f"dense_{metric}": dense, metric: ppl}
    if measured:  # an encoder: its own measure, under its own name
        dense = ppl = None
    report = api.build_report(result, model, dense, ppl, eval_config, model_name=args.model or DEFAULT_MODEL,
                              streamed=False, **measured, **({"zero_shot": scores} if scores else {}))
    import yaml

    if dense_size_speed is not None:
        tracker.enter(Stage.EVALUATING)
        report["size_speed"] = speed.size_speed_report(dense_size_speed, speed.size_and_speed(model))
        _say_size_speed(report)
        tracker.enter(Stage.EXPORTING)
    if not current_ranks().main:  # one of several processes (torchrun): rank 0 writes
        return 0
    def files(folder):  # the weights are written (and compressed): their size goes into the report
        report["storage"] = storage_of(folder)
        _say_storage(report["storage"])
        return {"secateurs_report.json": json.dumps(report, indent=2) + "\n",
                "secateurs_recipe.yaml": yaml.safe_dump(recipe.to_dict(), sort_keys=False)}

    save_model(model, tokenizer, output, overwrite=args.overwrite, extra_files=files,
               compress=compressible(result) if args.save_format == "sparse" else None)
    tracker.enter(Stage.COMPLETE)
    report["stage"] = tracker.stage.value
    report["stage_seconds"] = dict(tracker.seconds)
    report["export_seconds"] = round(time.perf_counter() - t, 3)
    if args.report:
        atomic.write_text(args.report, json.dumps(report, indent=2) + "\n")
    if (state_dir := api.walk_state_dir(args.output)).exists():  # the finished model supersedes it
        shutil.rmtree(state_dir)
    _say_saved(output, model)
    return 0


def _say_pruned(result, params: int) -> None:
    if result.layers:
        left = (f" ({sum(result.untouched.values()):,} weights in scope left as they are, counted)"
                if result.untouched else "")
        experts = result.experts
        rare = (f"; {experts['matrices']} expert matrices, {experts['by_magnitude']} of them pruned by magnitude "
                f"(fewer than {experts['min_tokens']} routed calibration tokens)" if experts else "")
        print(f"pruned {len(result.layers)} weight matrices in {result.prune_seconds:.1f} s; "
              f"measured sparsity {result.sparsity:.4f}{left}{rare}", flush=True)
    if result.structured:
        cut = sorted({(r.kind, r.before, r.after) for r in result.structured})
        print(f"structured: {len(result.structured)} cuts in {result.prune_seconds:.1f} s "
              f"({', '.join(f'{k} {b}->{a}' for k, b, a in cut[:4])}{' ...' if len(cut) > 4 else ''}); "
              f"{params:,} parameters", flush=True)


def _say_saved(output, model) -> None:
    print(f"saved to {output}", flush=True)
    if getattr(model.config, "secateurs_structure", None):
        print("its widths are recorded in config.json (secateurs_structure), which plain transformers cannot say "
              "(per-block widths, an encoder's fewer heads): load it with secateurs.load or the secateurs "
              "commands; from_pretrained refuses it on the sizes", flush=True)


def _say_storage(storage: dict) -> None:
    line = (f"weights on disk: {storage['weight_bytes'] / 2**20:,.1f} MiB, {storage['ratio']:.3f} of dense "
            f"({storage['format']})")
    if "encoded" in storage:
        e = storage["encoded"]
        line += (f"; the {e['weights']} encoded weights {e['bytes'] / 2**20:,.1f} MiB, {e['ratio']:.3f} of their "
                 "dense bytes")
    print(line, flush=True)


def _say_size_speed(report: dict) -> None:
    r, d, p = (report["size_speed"][k] for k in ("ratios", "dense", "pruned"))
    print(f"parameters {d['params']:,} -> {p['params']:,}; disk {d['disk_bytes'] / 2**20:.1f} -> "
          f"{p['disk_bytes'] / 2**20:.1f} MiB; prefill {d['prefill_tokens_per_s']['median']:.0f} -> "
          f"{p['prefill_tokens_per_s']['median']:.0f} tokens/s ({r['prefill_speedup']:.2f}x); decode "
          f"{d['decode_ms_per_token']['median']:.1f} -> {p['decode_ms_per_token']['median']:.1f} ms/token "
          f"({r['decode_speedup']:.2f}x)", flush=True)


def _prune_streamed(args, recipe, source, eval_config, checkpoint) -> int:
    """``prune`` of a safetensors folder, one block in memory at a time (:func:`api.prune_streamed`)."""
    import torch

    from . import api
    from .config import StructuredConfig
    from .data import load_text, tokenize
    from .eval import speed
    from .models.load import check_space, load_model, load_tokenizer
    from .export.compressed import storage_of
    from .models.stream import Checkpoint, open_streamed

    _threads(args)
    dtype = _dtype(args)
    tokenizer = load_tokenizer(source)
    show = not args.quiet
    first = recipe.stages[0]
    calib = api.calibration_data(tokenizer, first) if any(c.needs_calibration for c in recipe.stages) else None
    skeleton, weights = open_streamed(source, dtype)
    api.validate(skeleton, recipe, calib)  # before the dense evaluation, and so is the room for the output
    room, what = api.walk_room(skeleton, first, checkpoint)
    models = min(len(recipe.stages), 2)  # a stage's output waits beside the next one's
    check_space(args.output, None, extra=api.streamed_room(weights, dtype) * models + room, what=what)
    eval_ids = tokenize(tokenizer, load_text(eval_config.data, "test")) if eval_config else None
    dense = api.evaluate_streamed(source, tokenizer, eval_config, eval_ids, dtype, progress=show) if eval_config \
        else None
    if dense is not None:
        print(f"dense perplexity: {dense:.3f}", flush=True)
    name = args.model or DEFAULT_MODEL
    # a structured cut's speed is measured on each model whole, one at a time (--no-speed: never loaded whole)
    speed_of = None if args.no_speed or not any(isinstance(c, StructuredConfig) for c in recipe.stages) else \
        lambda folder: speed.size_and_speed(load_model(str(folder), dtype or "auto")[0])
    dense_size_speed = speed_of(source) if speed_of else None

    def finishing(folder, result):  # the model is written, not yet in place: measure it and write its report
        _say_pruned(result, sum(int(torch.Size(s).numel()) for s in Checkpoint(folder).shape.values()))
        ppl = api.evaluate_streamed(folder, tokenizer, eval_config, eval_ids, dtype, progress=show) \
            if eval_config else None
        if ppl is not None:
            print(f"pruned perplexity: {ppl:.3f}" + (f" (dense {dense:.3f})" if dense is not None else ""), flush=True)
        report = api.build_report(result, folder, dense, ppl, eval_config, model_name=name, streamed=True,
                                  storage=storage_of(folder))
        _say_storage(report["storage"])
        if dense_size_speed is not None:
            report["size_speed"] = speed.size_speed_report(dense_size_speed, speed_of(folder))
            _say_size_speed(report)
        if args.report:
            atomic.write_text(args.report, json.dumps(report, indent=2) + "\n")
        return {"secateurs_report.json": json.dumps(report, indent=2) + "\n"}

    import yaml

    api.prune_streamed(source, recipe, calib, args.output, dtype=dtype, tokenizer=tokenizer,
                       extra_files={"secateurs_recipe.yaml": yaml.safe_dump(recipe.to_dict(), sort_keys=False)},
                       finishing=finishing, overwrite=args.overwrite, progress=show, checkpoint=checkpoint,
                       save_format=args.save_format)
    if (state_dir := api.walk_state_dir(args.output)).exists():  # the finished model supersedes it
        shutil.rmtree(state_dir)
    print(f"saved to {args.output}", flush=True)
    return 0


def _evaluator(tokenizer, eval_config, show):
    from . import api
    from .data import load_text, tokenize

    ids = tokenize(tokenizer, load_text(eval_config.data, "test"))
    return lambda model: api.evaluate(model, tokenizer, eval_config, ids=ids, progress=show)


def cmd_finetune(args) -> int:
    from . import api
    from .data import load_text, tokenize
    from .eval import peak_rss_bytes
    from .models import check_output, check_space, save_model
    from .training import measured_sparsity, prunable_linears, state as training, train

    config = _train_config(args)
    eval_config = _eval_config(args)
    output = check_output(args.output, args.overwrite)
    if args.save_every < 0:
        raise ConfigError(f"--save-every must be >= 0, got {args.save_every}")
    classify = args.task == "classification"
    if classify:
        train_set, eval_set, classes, config = _classification_data(args, config, eval_config)
    elif args.epochs is not None:
        raise ConfigError("--epochs counts passes over labelled examples: it is for --task classification")
    elif args.steps is None:
        raise ConfigError("give the number of optimizer steps: --steps N")
    state_file = training.state_file(args.output)
    run = {"model": args.model or DEFAULT_MODEL, "data": args.data, "eval": eval_config.to_dict()}
    resume = None if args.no_resume else training.load_training_state(state_file, run, config)
    model, tokenizer = _load(args)
    show = not args.quiet
    metric, loss_of, train_ids = "perplexity", None, None
    evaluate = _evaluator(tokenizer, eval_config, show)
    if classify:
        from .eval.encoders import accuracy
        from .training.classify import ClassifierLoss, classifier_for

        model = classifier_for(model, classes)
        loss_of = ClassifierLoss(model, tokenizer, train_set, config.batch_size, config.seed, config.grad_accum)
        metric = "accuracy"
        evaluate = lambda m: accuracy(m, tokenizer, eval_set, eval_config.batch_size)["accuracy"]  # noqa: E731
    room, what = training.training_room(model, config, args.save_every, state_file)
    check_space(output, model, extra=16 * 2**20 + room, what=what)
    if not classify:
        train_ids = tokenize(tokenizer, load_text(args.data, "train"))
    names = list(prunable_linears(model))
    before = measured_sparsity(model, names)
    if resume is not None:
        print(f"resuming from {state_file} after step {resume['step']}", flush=True)
    print(f"training {config.steps} steps ({'LoRA rank ' + str(config.lora_rank) if config.lora_rank else 'all weights'}"
          f"{', gradual ' + config.schedule_value.name + ' to ' + str(config.schedule_value.final_sparsity) if config.schedule else ', mask frozen'}); "
          f"sparsity of the block linears now {before:.4f}", flush=True)
    history = train(model, train_ids, config, evaluate=evaluate, progress=show, save_every=args.save_every,
                    save_state=lambda state: training.save_training_state(state_file, {**state, "run": run}),
                    resume=resume, loss_of=loss_of, metric=metric)
    after = measured_sparsity(model, names)
    ppl0, ppl1 = history.evals[0][metric], history.evals[-1][metric]
    print(f"{metric} {ppl0:.4f} -> {ppl1:.4f}; sparsity {before:.4f} -> {after:.4f}; "
          f"{history.seconds:.0f} s", flush=True)
    report = {f"{metric}_before": ppl0, f"{metric}_after": ppl1, "sparsity_before": before, "sparsity_after": after,
              "history": history.to_dict(), "train": config.to_dict(), "eval": eval_config.to_dict(),
              "peak_rss_bytes": peak_rss_bytes(), "model_name": args.model or DEFAULT_MODEL, **api.environment()}
    save_model(model, tokenizer, output, overwrite=args.overwrite,
               extra_files={"secateurs_report.json": json.dumps(report, indent=2) + "\n"})
    if args.report:
        atomic.write_text(args.report, json.dumps(report, indent=2) + "\n")
    state_file.unlink(missing_ok=True)  # the finished model supersedes it
    _say_saved(output, model)
    return 0


def _classification_data(args, config, eval_config):
    """``finetune --task classification``: the labelled training and evaluation examples, their classes, and
    the training config with ``--epochs`` turned into steps."""
    from dataclasses import replace

    from .data.labelled import label_set, load_examples

    if args.data is None:
        raise ConfigError("--task classification needs labelled training examples: --data FILE.jsonl|.csv "
                          "(text, label) or a datasets name")
    if config.schedule or config.lora_rank:
        raise ConfigError("--task classification trains every weight with the masks held: no --schedule, no "
                          "--lora-rank")
    train_set, eval_set = load_examples(args.data, "train"), load_examples(eval_config.data, "test")
    classes = label_set(train_set, eval_set)
    if args.epochs is not None:
        if args.steps is not None:
            raise ConfigError("give --steps or --epochs, not both")
        if args.epochs <= 0:
            raise ConfigError(f"--epochs must be > 0, got {args.epochs}")
        config = replace(config, steps=max(1, math.ceil(args.epochs * len(train_set) /
                                                         (config.batch_size * config.grad_accum))))
    elif args.steps is None:
        raise ConfigError("give --epochs E (passes over the examples) or --steps N")
    return train_set, eval_set, classes, config


def cmd_iterate(args) -> int:
    from . import api
    from .config import PruneConfig
    from .data import load_text, tokenize
    from .models import check_output
    from .training import iterate
    from .training.iterate import check_room, cycle_targets

    listed = None
    if args.sparsities is not None:
        try:
            listed = [float(x) for x in args.sparsities.split(",") if x.strip()]
        except ValueError:
            raise ConfigError(f"--sparsities {args.sparsities!r} must be a comma list of numbers") from None
    targets = cycle_targets(listed, args.cycles, args.final_sparsity, args.initial_sparsity, args.cycle_schedule)
    prune_config = PruneConfig.from_dict(_overrides(args))
    train_config = _train_config(args)
    eval_config = _eval_config(args)
    check_output(args.output, overwrite=True)  # a folder of earlier cycles is resumed, not refused
    model, tokenizer = _load(args)
    check_room(model, args.output, len(targets), resume=not args.no_resume)
    show = not args.quiet
    calib = api.calibration_data(tokenizer, prune_config, model=model) if prune_config.needs_calibration else None
    train_ids = tokenize(tokenizer, load_text(args.train_data, "train"))
    print(f"{len(targets)} cycles to sparsities {', '.join(f'{t:.4f}' for t in targets)}; "
          f"{train_config.steps} retraining steps each", flush=True)
    history = iterate(model, tokenizer, prune_config, targets, train_config, args.output, calib, train_ids,
                      _evaluator(tokenizer, eval_config, show), resume=not args.no_resume, progress=show)
    for h in history:
        print(f"cycle {h['cycle']}: sparsity {h['sparsity']:.4f}; perplexity {h.get('perplexity_before', float('nan')):.3f} "
              f"-> pruned {h.get('perplexity_pruned', float('nan')):.3f} -> retrained "
              f"{h.get('perplexity_retrained', float('nan')):.3f} ({h['seconds']:.0f} s)", flush=True)
    return 0


def cmd_eval(args) -> int:
    from . import api
    from .models.load import load_tokenizer, streamable

    config = _eval_config(args)
    tasks = _zero_shot(args)
    manager = tasks.task_manager() if tasks else None  # unknown task names refused before the model loads
    _threads(args)
    source = None if args.no_stream or tasks else streamable(args.model)  # lm-eval scores a model in memory
    if source is not None:
        tokenizer = load_tokenizer(source)
        ppl = api.evaluate_streamed(source, tokenizer, config, dtype=_dtype(args), progress=not args.quiet)
        metric = "perplexity"
    else:
        from .eval.encoders import metric_of

        model, tokenizer = _load(args)
        metric = metric_of(model, config.metric)
        if metric == "accuracy":  # with its standard error and the number of examples
            from .data.labelled import load_examples
            from .eval.encoders import accuracy

            measured = accuracy(model, tokenizer, load_examples(config.data, "test"), config.batch_size)
            ppl = measured["accuracy"]
        else:
            ppl = api.evaluate(model, tokenizer, config, progress=not args.quiet)
    if metric == "accuracy":
        se = measured["accuracy_stderr"]
        print(f"accuracy: {ppl:.4f}" + (f" ± {se:.4f}" if se is not None else "") + f" ({measured['examples']} "
              "examples)")
    else:
        print(f"perplexity: {ppl:.3f}" if metric == "perplexity" else f"{metric}: {ppl:.4f}")
    scores = None
    if tasks:
        from .eval.tasks import zero_shot

        scores = zero_shot(model, tokenizer, tasks, manager, progress=not args.quiet)
        _say_zero_shot(scores)
    if args.report:
        report = {metric: ppl, "model": args.model, "eval": config.to_dict(), **api.environment(),
                  **({"zero_shot": scores, "tasks": tasks.to_dict()} if tasks else {})}
        atomic.write_text(args.report, json.dumps(report, indent=2) + "\n")
    return 0


def cmd_compare(args) -> int:
    from . import api
    from .models.load import load_tokenizer

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    settings = [s.strip() for s in args.sparsities.split(",") if s.strip()]
    base = _overrides(args)
    eval_config = _eval_config(args)
    api.compare_grid(methods, settings, base)  # validate the whole grid before loading anything
    name = args.model or DEFAULT_MODEL
    previous = _previous_table(args)
    if previous is not None:
        print(f"resuming {args.report}: dense and {len(previous.get('rows', []))} cell(s) already measured",
              flush=True)
    grid = api.compare_grid(methods, settings, base)
    cells = [c for _, _, c in grid]  # streamed only when every cell is: checked as one list of configs
    tasks = _zero_shot(args)
    if tasks:
        tasks.task_manager()  # unknown names refused before the model loads
    _threads(args)
    source = None if args.no_stream or tasks else api.stream_source(args.model, cells)  # lm-eval: in memory
    model, tokenizer = (source, load_tokenizer(source)) if source is not None else _load(args)

    def on_row(row):
        print(f"{row['method']:>10} {row['setting']:>8}: perplexity {row['perplexity']:.3f}, "
              f"sparsity {row['sparsity']:.4f}, {row['prune_seconds']:.1f} s", flush=True)
        if "zero_shot" in row:
            _say_zero_shot(row["zero_shot"])

    def checkpoint(table):  # every cell reaches the disk as soon as it is measured
        table["model"] = name
        if args.report:
            atomic.write_text(args.report, json.dumps(table, indent=2) + "\n")
        if args.markdown:
            atomic.write_text(args.markdown, api.markdown_table(table))

    table = api.compare(model, tokenizer, methods, settings, base, eval_config, progress=not args.quiet,
                        on_row=on_row, checkpoint=checkpoint, previous=previous, dtype=_dtype(args),
                        zero_shot=tasks)
    print(api.markdown_table(table))
    return 0


def cmd_sweep(args) -> int:
    from .sweep import Grid

    grid = Grid.load(args.grid)
    if (tasks := _zero_shot(args)) is not None:
        grid.zero_shot = tasks
    _run_sweep(args, grid, args.model or grid.model or DEFAULT_MODEL)
    return 0


def _run_sweep(args, grid, name: str) -> dict:
    from .models import load_model
    from .sweep import sweep

    _threads(args)
    first = list(load_model(name, args.dtype))
    tokenizer = first[1]

    def load():  # the model loaded above, then a fresh one after each structured cell
        return first.pop(0) if len(first) == 2 else load_model(name, args.dtype)[0]

    results = sweep(load, tokenizer, grid, args.output, model_name=name, progress=not args.quiet,
                    say=lambda line: print(line, flush=True))
    print(f"{len(results['cells'])} cells in {args.output}: results.json, results.csv, report.html", flush=True)
    return results


def cmd_sensitivity(args) -> int:
    from .sweep import Grid

    base = _overrides(args)
    if "include" in base:
        raise ConfigError("sensitivity prunes one block (or role) per cell: --include does not apply (--exclude "
                          "keeps layers dense in every cell)")
    grid = Grid.from_dict({"base": base, "eval": _eval_config(args).to_dict(),
                           "experiments": {"sensitivity": {"sensitivity": args.by}},
                           **({"zero_shot": _zero_shot(args).to_dict()} if args.tasks else {})})
    results = _run_sweep(args, grid, args.model or DEFAULT_MODEL)
    dense = results["dense"]["perplexity"]
    print(f"{'block':>5} {'role':>9} {'perplexity':>10} {'change':>8}   (dense {dense:.3f}; most sensitive first)")
    for row in sorted(results["cells"], key=lambda r: -r["perplexity"]):
        f = row["fields"]
        change = row["perplexity"] - dense
        print(f"{f['block']:>5} {f.get('role', 'all'):>9} {row['perplexity']:>10.3f} {change:>+8.3f}")
    return 0


def cmd_decompress(args) -> int:
    from .export.compressed import decompress, storage_of

    before = storage_of(args.input)
    decompress(args.input, args.output, overwrite=args.overwrite)
    print(f"decompressed {before['weight_bytes'] / 2**20:,.1f} MiB of weights into "
          f"{storage_of(args.output)['weight_bytes'] / 2**20:,.1f} MiB in {args.output}", flush=True)
    return 0


def cmd_export(args) -> int:
    from .export.gguf import export_gguf

    out = export_gguf(args.input, args.gguf, args.quant, overwrite=args.overwrite)
    print(f"wrote {out} ({out.stat().st_size / 2**20:,.1f} MiB, {args.quant})", flush=True)
    return 0


def _previous_table(args) -> "dict | None":
    """With ``--resume``, the table saved in ``--report`` by an earlier run (None when there is none yet)."""
    from . import api

    if not args.resume:
        return None
    if not args.report:
        raise ConfigError("--resume needs --report FILE.json: the table to continue")
    return api.read_table(args.report, model=args.model or DEFAULT_MODEL)


def main(argv=None) -> int:
    from .allocator import reuse_freed_memory
    from .errors import SecateursError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.quiet:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    commands = {"prune": cmd_prune, "eval": cmd_eval, "compare": cmd_compare, "finetune": cmd_finetune,
                "iterate": cmd_iterate, "decompress": cmd_decompress, "sweep": cmd_sweep,
                "sensitivity": cmd_sensitivity,
                "export": cmd_export}
    # a kill (SIGTERM: a scheduler's time limit, `kill`) unwinds like Ctrl-C, so temporary folders are removed
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if on_main_thread else None
    try:
        reuse_freed_memory()  # this process is ours: keep freed activations for reuse (see allocator.py)
        _check_file_flags(args)
        if launched():
            _join_ranks(args)
        return commands[args.command](args)
    # OSError: the machine said no (a disk that fills up, a file that vanished): not a bug, so one line too
    except (SecateursError, OSError) as exc:
        print(f"secateurs: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except RuntimeError as exc:
        if not (launched() and lost_a_rank(exc)):
            raise
        print("secateurs: error: another process of this run stopped (its message says why); nothing was saved",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        how = "terminated" if isinstance(exc, Terminated) else "interrupted"
        print(f"secateurs: {how}; {_kept_on_interrupt(args)}", file=sys.stderr)
        return 128 + (signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT)
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
        stop_ranks()


def _join_ranks(args) -> None:
    """This process is one of several torchrun started: join them; only rank 0 prints and writes files."""
    from .engine.distributed import start
    from .errors import ConfigError

    if args.command not in ("prune", "eval"):
        raise ConfigError(f"{args.command} runs in one process: torchrun runs prune and eval")
    if getattr(args, "tasks", None):
        raise ConfigError("--tasks (lm-eval) runs in one process: run it without torchrun")
    ranks = start(getattr(args, "device", None) or "cpu")
    if not ranks.main:
        sys.stdout = open(os.devnull, "w")
        logging.getLogger().setLevel(logging.WARNING)
        args.quiet, args.report = True, None


def _check_file_flags(args) -> None:
    """Refuse a --report/--markdown path that cannot become a file before any work, not after it."""
    from .models.load import check_file_path

    for flag in ("report", "markdown"):
        if value := getattr(args, flag, None):
            check_file_path(value, f"--{flag} {value!r}")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is so that it unwinds (and cleans up) as after Ctrl-C."""


def _raise_terminated(signum, frame):
    raise Terminated


def _kept_on_interrupt(args) -> str:
    """What an interrupted command leaves behind, and how to go on from it."""
    from . import api
    from .engine import WalkCheckpoint
    from .training import state as training

    if args.command == "compare" and args.report:
        return f"the cells measured so far are in {args.report}; add --resume to the same command to finish it"
    if args.command == "finetune" and (state := training.state_file(args.output)).exists():
        return f"the last checkpoint is {state}; the same command resumes from it"
    if args.command == "prune" and (block := WalkCheckpoint(api.walk_state_dir(args.output)).saved_block) is not None:
        return (f"the walk's state after block {block} is in {api.walk_state_dir(args.output)}; the same command "
                "resumes from it")
    if args.command in ("sweep", "sensitivity") and (Path(args.output) / "results.json").exists():
        return f"the finished cells are in {Path(args.output) / 'results.json'}; the same command runs the rest"
    if args.command == "iterate":
        return f"finished cycles are kept in {args.output}; the same command resumes after the last one"
    return "nothing was saved"


if __name__ == "__main__":
    sys.exit(main())
