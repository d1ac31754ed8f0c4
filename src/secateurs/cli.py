"""``secateurs`` command line: ``prune``, ``eval``, ``compare``.

Every error a user can cause (bad sparsity, pattern, path, data...) ends in one line on stderr and exit
status 2; nothing is written to the output folder unless the whole run succeeded.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

EXIT_USAGE = 2


def _write_atomic(path: "str | Path", text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def _add_model(p):
    p.add_argument("--model", default=None, help="hub id, local folder, .gguf file or built-in name "
                   "(default: smollm2-135m)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_eval(p, data_flag="--eval-data"):
    p.add_argument(data_flag, dest="eval_data", default=None, help="evaluation data (test split): enwiki, "
                   "a .txt/.jsonl file or a datasets name (default: enwiki)")
    p.add_argument("--eval-seqlen", type=int, default=None, help="tokens per window (default 1024)")
    p.add_argument("--eval-windows", type=int, default=None, help="number of windows; 0 = the whole split (default 16)")
    p.add_argument("--eval-stride", type=int, default=None, help="window stride (default: seqlen, no overlap)")


def _add_prune(p, single_method=True):
    if single_method:
        p.add_argument("--method", default=None, help="magnitude | wanda | sparsegpt (default: wanda)")
        p.add_argument("--sparsity", type=float, default=None, help="fraction of weights removed (default 0.5; "
                       "implied by N:M)")
        p.add_argument("--pattern", default=None, help="unstructured | N:M (N kept of every M) | block:B")
        p.add_argument("--group", default=None, help="score comparison group: row | layer | global")
        p.add_argument("--threshold", type=float, default=None, help="magnitude: prune |w| < threshold")
        p.add_argument("--layer-sparsity", action="append", default=None, metavar="REGEX=S",
                       help="per-layer override, repeatable: 'mlp=0.6', 'blocks:0-4=0.3'")
        p.add_argument("--recipe", default=None, help="YAML/JSON recipe (flags override its top level)")
    p.add_argument("--include", action="append", default=None, help="attention | mlp | all | REGEX (repeatable)")
    p.add_argument("--exclude", action="append", default=None, help="REGEX of layers to keep dense (repeatable)")
    p.add_argument("--calib-data", default=None, help="calibration data (train split); default enwiki")
    p.add_argument("--calib-samples", type=int, default=None, help="calibration windows (default 128)")
    p.add_argument("--calib-seqlen", type=int, default=None, help="tokens per window (default 2048)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="calibration samples per block forward (default 8)")
    p.add_argument("--blocksize", type=int, default=None, help="sparsegpt lazy-update block (default 128)")
    p.add_argument("--percdamp", type=float, default=None, help="sparsegpt damping (default 0.01)")
    p.add_argument("--propagate", choices=["pruned", "dense"], default=None,
                   help="next block sees pruned (default) or dense outputs")
    p.add_argument("--true-sequential", action="store_true", default=None,
                   help="re-observe each sub-group of a block after pruning the previous one")
    p.add_argument("--device", default=None, help="compute device for each block (default cpu)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="secateurs", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prune", help="prune a model, measure perplexity, save it")
    _add_model(p)
    _add_prune(p)
    _add_eval(p)
    p.add_argument("--no-eval", action="store_true", help="skip the perplexity measurements")
    p.add_argument("--output", required=True, help="folder for the pruned model (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--report", default=None, help="write the JSON report here (also saved in the output folder)")

    p = sub.add_parser("eval", help="perplexity of a model")
    _add_model(p)
    _add_eval(p, "--data")
    p.add_argument("--report", default=None, help="write the JSON result here")

    p = sub.add_parser("compare", help="dense + every method x sparsity: the researcher's table")
    _add_model(p)
    p.add_argument("--methods", default="magnitude,wanda,sparsegpt")
    p.add_argument("--sparsities", default="0.5,2:4,4:8", help="comma list of 0.5 (unstructured), N:M, block:B@S")
    _add_prune(p, single_method=False)
    _add_eval(p)
    p.add_argument("--report", default=None, help="write the JSON table here")
    p.add_argument("--markdown", default=None, help="write the markdown table here")
    return parser


_FLAG_FIELDS = ["method", "sparsity", "pattern", "group", "threshold", "include", "exclude", "calib_data",
                "calib_samples", "calib_seqlen", "seed", "batch_size", "blocksize", "percdamp", "propagate",
                "true_sequential", "device"]


def _overrides(args) -> dict:
    out = {k: getattr(args, k) for k in _FLAG_FIELDS if getattr(args, k, None) is not None}
    if getattr(args, "layer_sparsity", None):
        out["layer_sparsity"] = args.layer_sparsity
    return out


def _eval_config(args, base=None):
    """Evaluation settings: command-line flags over the recipe's ``eval`` section over the defaults."""
    from dataclasses import replace

    from .config import EvalConfig

    flags = {"data": args.eval_data, "seqlen": args.eval_seqlen, "stride": args.eval_stride}
    changes = {k: v for k, v in flags.items() if v is not None}
    if args.eval_windows is not None:
        changes["windows"] = args.eval_windows or None
    return replace(base or EvalConfig(), **changes)


def _load(args):
    import torch

    from .models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    return load_model(args.model)


def cmd_prune(args) -> int:
    from . import api
    from .config import PruneConfig, Recipe
    from .data import load_text, tokenize
    from .models import save_model
    from .progress import Stage, Tracker

    overrides = _overrides(args)
    recipe = Recipe.load(args.recipe, overrides) if args.recipe else Recipe([PruneConfig.from_dict(overrides)])
    recipe.eval = _eval_config(args, recipe.eval)
    eval_config = None if args.no_eval else recipe.eval
    output = Path(args.output)
    if output.exists() and any(output.iterdir()) and not args.overwrite:
        raise FileExistsError(f"output folder {args.output!r} exists and is not empty (use --overwrite)")

    model, tokenizer = _load(args)
    show = not args.quiet
    eval_ids = calib = None
    if eval_config:
        eval_ids = tokenize(tokenizer, load_text(eval_config.data, "test"))
    first = recipe.stages[0]
    if any(c.needs_calibration for c in recipe.stages):
        calib = api.calibration_data(tokenizer, first)
    dense = api.evaluate(model, tokenizer, eval_config, ids=eval_ids, progress=show) if eval_config else None
    if dense is not None:
        print(f"dense perplexity: {dense:.3f}", flush=True)

    tracker = Tracker(show=show)
    result = api.prune(model, recipe, calib, tracker=tracker)
    print(f"pruned {len(result.layers)} weight matrices in {result.prune_seconds:.1f} s; "
          f"measured sparsity {result.sparsity:.4f}", flush=True)
    ppl = None
    if eval_config:
        tracker.enter(Stage.EVALUATING)
        ppl = api.evaluate(model, tokenizer, eval_config, ids=eval_ids, progress=show)
        print(f"pruned perplexity: {ppl:.3f}" + (f" (dense {dense:.3f})" if dense is not None else ""), flush=True)
    tracker.enter(Stage.EXPORTING)
    t = time.perf_counter()
    report = api.build_report(result, model, dense, ppl, eval_config, model_name=args.model or "smollm2-135m")
    import yaml

    save_model(model, tokenizer, output, overwrite=args.overwrite, extra_files={
        "secateurs_report.json": json.dumps(report, indent=2) + "\n",
        "secateurs_recipe.yaml": yaml.safe_dump(recipe.to_dict(), sort_keys=False)})
    tracker.enter(Stage.COMPLETE)
    report["stage"] = tracker.stage.value
    report["stage_seconds"] = dict(tracker.seconds)
    report["export_seconds"] = round(time.perf_counter() - t, 3)
    if args.report:
        _write_atomic(args.report, json.dumps(report, indent=2) + "\n")
    print(f"saved to {output}", flush=True)
    return 0


def cmd_eval(args) -> int:
    from . import api

    model, tokenizer = _load(args)
    config = _eval_config(args)
    ppl = api.evaluate(model, tokenizer, config, progress=not args.quiet)
    print(f"perplexity: {ppl:.3f}")
    if args.report:
        _write_atomic(args.report, json.dumps({"perplexity": ppl, "model": args.model, "eval": config.to_dict(),
                                               **api.environment()}, indent=2) + "\n")
    return 0


def cmd_compare(args) -> int:
    from . import api
    from .config import PruneConfig

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    settings = [s.strip() for s in args.sparsities.split(",") if s.strip()]
    base = PruneConfig.from_dict(_overrides(args))
    eval_config = _eval_config(args)
    for m in methods:  # validate the whole grid before loading anything
        for s in settings:
            base.override(method=m, **api.parse_setting(s), group=None, threshold=None)
    model, tokenizer = _load(args)

    def on_row(row):
        print(f"{row['method']:>10} {row['setting']:>8}: perplexity {row['perplexity']:.3f}, "
              f"sparsity {row['sparsity']:.4f}, {row['prune_seconds']:.1f} s", flush=True)

    table = api.compare(model, tokenizer, methods, settings, base, eval_config, progress=not args.quiet,
                        on_row=on_row)
    table["model"] = args.model or "smollm2-135m"
    md = api.markdown_table(table)
    print(md)
    if args.report:
        _write_atomic(args.report, json.dumps(table, indent=2) + "\n")
    if args.markdown:
        _write_atomic(args.markdown, md)
    return 0


def main(argv=None) -> int:
    from .config import ConfigError
    from .data import DataError
    from .engine import VerificationError
    from .models import ArchitectureError, ModelLoadError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.quiet:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    commands = {"prune": cmd_prune, "eval": cmd_eval, "compare": cmd_compare}
    try:
        return commands[args.command](args)
    except (ConfigError, DataError, ModelLoadError, ArchitectureError, VerificationError, FileExistsError,
            ValueError) as exc:
        print(f"secateurs: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("secateurs: interrupted; nothing was saved", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
