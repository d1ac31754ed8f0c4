"""Sweeps: grids of pruning runs on one model, every cell from the dense weights, resumable, with a report.

A grid file (YAML or JSON) names the settings every cell shares and one or more **experiments**, each a
mapping of config fields where a list is an axis and anything else is fixed; an experiment's cells are the
product of its axes::

    base: {calib_samples: 16, calib_seqlen: 256}   # config fields of every cell
    eval: {seqlen: 512, windows: 8}                # EvalConfig fields
    train: {batch_size: 2, seqlen: 256, lr: 1e-4}  # TrainConfig fields, for cells with finetune_steps
    zero_shot: {tasks: [arc_easy], limit: 100}     # lm-eval tasks (optional)
    experiments:
      sparsity: {method: wanda, sparsity: [0.3, 0.5, 0.7]}
      scopes:   {method: wanda, include: [all, attention, mlp]}   # an axis of one scope each
      recovery: {method: wanda, finetune_steps: [0, 20, 50]}
      blocks:   {method: wanda, sensitivity: block}               # one cell per block: that block alone pruned

Keys are the fields of :class:`~.config.PruneConfig` or :class:`~.config.StructuredConfig` (a method's
options too), plus ``finetune_steps`` (recovery fine-tuning after the prune, 0 = none) and ``sensitivity``
(``block`` or ``role``: the experiment's cells prune one block, or one block's attention or MLP, at a time).
For ``include``/``exclude``/``layer_sparsity`` a list of strings is an axis of single values; write a list of
lists for several values in one cell.  A cell that two experiments share runs once.

Every cell starts from the dense weights, with the calibration windows and evaluation windows its settings
name (the same for cells that share them).  After each cell ``results.json`` is rewritten, so a crash or
Ctrl-C loses at most the cell that was running; run the same command again and only the missing cells run.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import re
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from . import atomic
from .config import EvalConfig, PruneConfig, StructuredConfig, check_field_types, config_from_dict, read_mapping
from .errors import ConfigError
from .eval.tasks import ZeroShot
from .methods.base import option_table

SENSITIVITY = ("block", "role")
SWEEP_KEYS = ("finetune_steps", "sensitivity")  # read by the sweep, not by a config
SEQUENCE_FIELDS = ("include", "exclude", "layer_sparsity")  # config fields that hold a tuple
SECTIONS = ("model", "base", "eval", "train", "zero_shot", "speed", "experiments")


def _config_keys() -> set:
    return {f.name for f in fields(PruneConfig)} | {f.name for f in fields(StructuredConfig)} | set(option_table())


def _axis(key: str, value) -> "list | None":
    """The values of an axis, or None when ``value`` is fixed."""
    if not isinstance(value, list):
        return None
    if key in SEQUENCE_FIELDS and not any(isinstance(v, list) for v in value):
        return [[v] for v in value]  # include: [all, attention, mlp] -> three cells of one scope each
    return value


@dataclass(frozen=True)
class Cell:
    """One run of a sweep: its own settings (``fields``, what the grid gave it) and the config they make."""

    fields: dict
    config: "PruneConfig | StructuredConfig"
    experiments: tuple = ()

    @property
    def key(self) -> str:
        """What the cell runs: its whole config and what the sweep adds.  Cells of two experiments that run
        the same (``include: all`` and the default scope, ``finetune_steps: 0`` and none) are one cell."""
        extra = {k: self.fields[k] for k in ("finetune_steps", "block", "role") if k in self.fields}
        return json.dumps({"config": self.config.to_dict(), **extra}, sort_keys=True)

    @property
    def finetune_steps(self) -> int:
        return int(self.fields.get("finetune_steps", 0))

    def describe(self) -> str:
        shown = {k: v for k, v in self.fields.items() if k != "include" or "block" not in self.fields}
        return " ".join(f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}" for k, v in shown.items())


@dataclass
class Grid:
    """A parsed grid file: shared settings and experiments (see the module docstring)."""

    experiments: dict  # name -> {key: value or list of values}
    base: dict = field(default_factory=dict)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: dict = field(default_factory=dict)
    zero_shot: "ZeroShot | None" = None
    speed: "bool | None" = None  # measure every cell's CPU speed against dense; None: structured cells only
    model: "str | None" = None

    @classmethod
    def from_dict(cls, data: dict) -> "Grid":
        """Parse and check a grid; every problem found is listed in one :class:`ConfigError`."""
        problems = []
        if unknown := sorted(set(data) - set(SECTIONS)):
            problems.append(f"unknown section(s) {', '.join(unknown)} (known: {', '.join(SECTIONS)})")
        experiments = data.get("experiments")
        if not isinstance(experiments, dict) or not experiments:
            problems.append("experiments: name at least one, each a mapping of config fields (a list = an axis)")
            experiments = {}
        base = data.get("base") or {}
        if not isinstance(base, dict):
            problems.append(f"base must be a mapping of config fields, got {base!r}")
            base = {}
        known = _config_keys()
        broken = set()  # experiments whose cells are not built: their problem is said already
        for key, value in base.items():
            owner = next((c for c in (PruneConfig, StructuredConfig) if key in {f.name for f in fields(c)}), None)
            try:
                if owner is not None and not (isinstance(value, list) and key not in SEQUENCE_FIELDS):
                    check_field_types(owner, {key: value})
            except ConfigError as exc:
                problems.append(f"base: {exc}")
                broken = set(experiments)
        for where, mapping in [("base", base), *((f"experiments.{n}", e) for n, e in experiments.items())]:
            if not isinstance(mapping, dict) or (where != "base" and not mapping):
                problems.append(f"{where} must be a mapping of config fields, got {mapping!r}")
                continue
            allowed = known | (set(SWEEP_KEYS) if where != "base" else set())
            count = len(problems)
            if unknown := sorted(set(mapping) - allowed):
                problems.append(f"{where}: unknown field(s) {', '.join(unknown)}")
            for key, value in mapping.items():
                if isinstance(value, list) and not value:
                    problems.append(f"{where}.{key}: empty axis (give at least one value)")
                elif where == "base" and isinstance(value, list) and key not in SEQUENCE_FIELDS:
                    problems.append(f"base.{key}: a list; axes belong in an experiment")
            steps = mapping.get("finetune_steps", 0)
            for s in steps if isinstance(steps, list) else [steps]:
                if isinstance(s, bool) or not isinstance(s, int) or s < 0:
                    problems.append(f"{where}.finetune_steps: {s!r} is not a whole number >= 0")
            if mapping.get("sensitivity", "block") not in SENSITIVITY:
                problems.append(f"{where}.sensitivity must be one of {', '.join(SENSITIVITY)}, got "
                                f"{mapping['sensitivity']!r}")
            if "sensitivity" in mapping and "include" in mapping:
                problems.append(f"{where}: sensitivity chooses each cell's layers, so include does not apply "
                                "(exclude keeps layers dense in every cell)")
            if len(problems) > count:
                broken.add(where.removeprefix("experiments."))
        parsed = {}
        for section, build in (("eval", lambda d: _fields_of(EvalConfig, d)), ("zero_shot", ZeroShot.from_dict),
                               ("train", _train_config)):
            if data.get(section) is not None:
                try:
                    parsed[section] = build(data[section])
                except ConfigError as exc:
                    problems.append(f"{section}: {exc}")
        speed = data.get("speed")
        if speed is not None and not isinstance(speed, bool):
            problems.append(f"speed must be true or false, got {speed!r}")
        grid = cls(experiments, base, parsed.get("eval", EvalConfig()), data.get("train") or {},
                   parsed.get("zero_shot"), speed, data.get("model"))
        problems += grid.check_cells(skip=broken)
        if problems:
            raise ConfigError(f"the grid has {len(problems)} problem(s):\n  - " + "\n  - ".join(problems))
        return grid

    @classmethod
    def load(cls, path) -> "Grid":
        data = read_mapping(path)
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None

    def to_dict(self) -> dict:
        return {"model": self.model, "base": self.base, "eval": self.eval.to_dict(), "train": self.train,
                "zero_shot": self.zero_shot.to_dict() if self.zero_shot else None, "speed": self.speed,
                "experiments": self.experiments}

    def setup(self) -> dict:
        """What every cell shares: a saved sweep resumes only under the same."""
        return json.loads(json.dumps({k: v for k, v in self.to_dict().items() if k != "experiments"}))

    # ------------------------------------------------------------------ cells
    def _settings(self, name: str, linears: "dict | None") -> list[dict]:
        """The cells' own settings of one experiment, in the order of its axes; ``sensitivity`` experiments
        need the model's block linears ``{block: {name: role}}`` (None: one placeholder cell, for checks)."""
        spec = self.experiments[name]
        keys = list(spec)
        axes = [_axis(k, v) or [v] for k, v in spec.items()]
        cells = [dict(zip(keys, values)) for values in itertools.product(*axes)]
        for cell in cells:
            if cell.get("finetune_steps") == 0:
                cell.pop("finetune_steps")  # the same cell as one without fine-tuning
        if "sensitivity" not in spec:
            return cells
        out = []
        for cell in cells:
            for block, names in (linears or {0: {"": "attention"}}).items():
                by_role = cell["sensitivity"] == "role"
                groups = {r: [n for n, role in names.items() if role == r] for r in ("attention", "mlp")} \
                    if by_role else {None: list(names)}
                for role, members in groups.items():
                    if not members:
                        continue
                    scope = ["^(" + "|".join(map(re.escape, members)) + ")$"] if linears else ["all"]
                    out.append({**cell, "block": block, **({"role": role} if role else {}), "include": scope})
        return out

    def cells(self, linears: "dict | None" = None) -> list[Cell]:
        """Every distinct cell, in the grid's order; a cell that several experiments hold lists them all."""
        found: dict[str, Cell] = {}
        for name in self.experiments:
            for settings in self._settings(name, linears):
                cell = Cell(settings, _build(self.base, settings), (name,))
                if cell.key in found:
                    old = found[cell.key]
                    found[cell.key] = Cell(old.fields, old.config, old.experiments + (name,))
                else:
                    found[cell.key] = cell
        return list(found.values())

    def check_cells(self, skip=()) -> list[str]:
        """Every cell's config built (the model not needed): one line per cell that no config accepts."""
        problems = []
        for name in [n for n in self.experiments if n not in skip]:
            for settings in self._settings(name, None):
                try:
                    _build(self.base, settings)
                except (ConfigError, TypeError) as exc:
                    shown = Cell(settings, None).describe() or "(the base settings)"
                    problems.append(f"experiments.{name}: {shown}: {exc}")
        return problems


def _fields_of(cls, data, exclude=()):
    """``cls(**data)`` for a mapping of its fields; anything else, or an unknown field, refused in one line."""
    if not isinstance(data, dict):
        raise ConfigError(f"must be a mapping of {cls.__name__} fields, got {data!r}")
    known = [f.name for f in fields(cls) if f.name not in exclude]
    if unknown := sorted(set(data) - set(known)):
        raise ConfigError(f"unknown field(s) {', '.join(unknown)} (known: {', '.join(known)})")
    check_field_types(cls, data)
    return cls(**data)


def _train_config(data: dict):
    """The fine-tune settings of a grid's ``train`` section (``steps`` comes from each cell's finetune_steps;
    ``data`` names the training text, default enwiki), checked with a stand-in step count."""
    from .training import TrainConfig

    if isinstance(data, dict) and "steps" in data:
        raise ConfigError("steps: each cell's finetune_steps gives it")
    given = {k: v for k, v in data.items() if k != "data"} if isinstance(data, dict) else data
    return _fields_of(TrainConfig, given, exclude=("steps",))


def _build(base: dict, settings: dict):
    given = {k: v for k, v in settings.items() if k not in (*SWEEP_KEYS, "block", "role")}
    return config_from_dict({**base, **given})


# ---------------------------------------------------------------------------------------------- running


def block_linears(model) -> dict:
    """``{block index: {linear name: role}}``: what a sensitivity experiment prunes, one group at a time."""
    from .models.arch import find_blocks, find_linears, role_of

    prefix, blocks = find_blocks(model)
    return {i: {name: role_of(name) for name in find_linears(block, f"{prefix}.{i}.")}
            for i, block in enumerate(blocks)}


def read_results(path) -> "dict | None":
    """A sweep's saved ``results.json`` (None when there is none yet)."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot resume from {path}: {exc}") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("cells"), list) or "setup" not in saved:
        raise ConfigError(f"cannot resume from {path}: it is not a sweep's results.json")
    return saved


class _Data:
    """Token ids a sweep reads: calibration windows by their settings, the evaluation and training texts."""

    def __init__(self, tokenizer, grid: Grid):
        from .data import load_text, tokenize

        self.tokenizer, self.grid, self._calib, self._train = tokenizer, grid, {}, None
        self._text = lambda spec, split: tokenize(tokenizer, load_text(spec, split))
        self.eval_ids = self._text(grid.eval.data, "test")

    def calibration(self, cfg):
        from .data import calibration_windows

        if not cfg.needs_calibration:
            return None
        key = (cfg.calib_data, cfg.calib_samples, cfg.calib_seqlen, cfg.seed)
        if key not in self._calib:
            self._calib[key] = calibration_windows(self._text(cfg.calib_data, "train"), *key[1:])
        return self._calib[key]

    @property
    def train_ids(self):
        if self._train is None:
            self._train = self._text(self.grid.train.get("data"), "train")
        return self._train


def measure_model(model, tokenizer, data: _Data, grid: Grid, progress: bool, speed: bool) -> dict:
    """What every row reports about a model as it is now: perplexity, parameters, bytes, and when asked
    zero-shot scores and speed."""
    from .api import evaluate
    from .eval.speed import measure
    from .eval.tasks import zero_shot
    from .models.snapshot import weight_bytes

    t = time.perf_counter()
    out = {"perplexity": evaluate(model, tokenizer, grid.eval, ids=data.eval_ids, progress=progress),
           "params": sum(p.numel() for p in model.parameters()), "weight_bytes": weight_bytes(model)}
    if grid.zero_shot is not None:
        out["zero_shot"] = zero_shot(model, tokenizer, grid.zero_shot, progress=progress)
    if speed:
        out["speed"] = measure(model, seqlen=256, new_tokens=16, repeats=3)
    out["eval_seconds"] = round(time.perf_counter() - t, 3)
    return out


def run_cell(model, tokenizer, cell: Cell, data: _Data, grid: Grid, progress: bool, speed: bool) -> dict:
    """Prune ``model`` (dense) as ``cell`` says, fine-tune it when asked, measure it: the cell's row."""
    from .api import evaluate, prune
    from .eval import peak_rss_bytes
    from .training import TrainConfig, train

    result = prune(model, cell.config, data.calibration(cell.config), progress=progress)
    row = {"key": cell.key, "experiments": list(cell.experiments), "fields": cell.fields,
           "config": cell.config.to_dict(), "sparsity": result.sparsity,
           "prune_seconds": round(result.prune_seconds, 3), "per_layer": result.per_layer}
    if cell.finetune_steps:
        config = TrainConfig(**{k: v for k, v in grid.train.items() if k != "data"}, steps=cell.finetune_steps)
        history = train(model, data.train_ids, config, progress=progress, evaluate=lambda m: evaluate(
            m, tokenizer, grid.eval, ids=data.eval_ids, progress=progress))
        model.eval()
        row.update(perplexity_pruned=history.evals[0]["perplexity"], finetune_seconds=round(history.seconds, 3),
                   recovery=[{"step": e["step"], "perplexity": e["perplexity"]} for e in history.evals])
    row.update(measure_model(model, tokenizer, data, grid, progress, speed))
    row["peak_rss_bytes"] = peak_rss_bytes()
    return row


def sweep(load, tokenizer, grid: Grid, output, *, model_name: str, progress: bool = True, say=print) -> dict:
    """Run every cell of ``grid`` not yet in ``output/results.json``; write results.json, results.csv and
    report.html into ``output`` after each cell.  ``load()`` gives the dense model (called again after a
    structured cell, whose model has new shapes).  Returns the results."""
    from .api import environment, validate
    from .eval.sweep_report import write_report
    from .models.arch import head_of
    from .models.load import check_writable
    from .models.snapshot import WeightSnapshot

    output = Path(output)
    check_writable(output, f"the sweep's folder {str(output)!r}")  # made by the first write, after every check
    previous = read_results(output / "results.json")
    setup = {**grid.setup(), "model": model_name}
    if previous is not None and previous["setup"] != setup:
        differ = sorted(k for k in set(setup) | set(previous["setup"]) if setup.get(k) != previous["setup"].get(k))
        raise ConfigError(f"{output} holds a sweep made with other shared settings ({', '.join(differ)}); give "
                          "another --output, or remove it to start again")
    if grid.zero_shot is not None:
        grid.zero_shot.task_manager()  # unknown task names are refused before any work
    model = load()
    if head_of(model) != "causal":
        raise ConfigError(f"{type(model).__name__} is an encoder: a sweep measures causal language models by "
                          "perplexity; prune and evaluate an encoder run by run (docs/encoders.md)")
    data = _Data(tokenizer, grid)
    cells = grid.cells(block_linears(model))
    problems = []
    for cell in cells:  # against the model and its calibration, before the first cell runs
        try:
            validate(model, cell.config, data.calibration(cell.config))
        except (ConfigError, ValueError) as exc:
            problems.append(f"{'/'.join(cell.experiments)}: {cell.describe()}: {exc}")
    if problems:
        raise ConfigError(f"{len(problems)} cell(s) cannot run on this model:\n  - " + "\n  - ".join(problems))
    timed = [c.key for c in cells if grid.speed or (grid.speed is None and isinstance(c.config, StructuredConfig))]
    results = {"setup": setup, "grid": json.loads(json.dumps(grid.to_dict())), "dense": None, "cells": [],
               "complete": False}
    done = {}
    if previous is not None:
        results["dense"] = previous.get("dense")
        done = {row["key"]: row for row in previous["cells"]}
    for cell in cells:  # a cell now in more experiments than when it ran says so
        if cell.key in done:
            done[cell.key]["experiments"] = list(cell.experiments)

    def save():
        results["cells"] = [done[c.key] for c in cells if c.key in done]
        results.update(environment())
        atomic.write_text(output / "results.json", json.dumps(results, indent=1) + "\n")
        atomic.write_text(output / "results.csv", results_csv(results))
        write_report(results, output)

    if results["dense"] is None or (timed and "speed" not in results["dense"]):
        say("measuring the dense model")
        results["dense"] = measure_model(model, tokenizer, data, grid, progress, bool(timed))
        save()
    todo = [c for c in cells if c.key not in done]
    say(f"{len(cells)} cells: {len(cells) - len(todo)} done, {len(todo)} to run")
    started = time.perf_counter()
    with WeightSnapshot(model) as dense:
        for k, cell in enumerate(todo, 1):
            t = time.perf_counter()
            try:
                done[cell.key] = row = run_cell(model, tokenizer, cell, data, grid, progress, cell.key in timed)
            finally:
                if isinstance(cell.config, StructuredConfig):
                    model = load()  # its shapes changed: a fresh dense model
                else:
                    dense.restore(model)
                    model.eval()
            save()
            eta = (time.perf_counter() - started) / k * (len(todo) - k)
            say(f"cell {k}/{len(todo)} [{', '.join(cell.experiments)}] {cell.describe()}: perplexity "
                f"{row['perplexity']:.3f}, sparsity {row['sparsity']:.4f} ({time.perf_counter() - t:.0f} s"
                f"{f'; about {eta / 60:.1f} min left' if k < len(todo) else ''})")
    results["complete"] = True
    save()
    return results


# ---------------------------------------------------------------------------------------------- tables


def _flat(value) -> str:
    if isinstance(value, (list, tuple)):
        return ";".join(map(str, value))
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True) if value else ""
    return "" if value is None else str(value)


def rows(results: dict) -> list[dict]:
    """One flat row per cell (dense first): experiments, every config field, the measured figures."""
    from .eval.speed import speed_ratios
    from .eval.tasks import headline

    dense = results.get("dense") or {}
    out = []
    first = [{"experiments": ["dense"], "config": {"method": "dense"}, "sparsity": 0.0, **dense}] if dense else []
    for row in first + results["cells"]:
        flat = {"experiment": _flat(row["experiments"]), **{k: _flat(v) for k, v in row["config"].items()},
                "block": row.get("fields", {}).get("block", ""), "role": row.get("fields", {}).get("role", ""),
                "finetune_steps": row.get("fields", {}).get("finetune_steps", 0) if "fields" in row else 0}
        for key in ("perplexity", "perplexity_pruned", "sparsity", "params", "weight_bytes", "prune_seconds",
                    "finetune_seconds", "eval_seconds", "peak_rss_bytes"):
            flat[key] = row.get(key, "")
        for task, (metric, value, stderr) in headline(row.get("zero_shot") or {}).items():
            flat[f"{task}:{metric}"], flat[f"{task}:{metric}_stderr"] = value, "" if stderr is None else stderr
        if "speed" in row and "speed" in dense:
            ratios = speed_ratios(dense["speed"], row["speed"])
            flat["prefill_speedup"], flat["decode_speedup"] = ratios["prefill_speedup"], ratios["decode_speedup"]
        out.append(flat)
    return out


def results_csv(results: dict) -> str:
    table = rows(results)
    columns = list(dict.fromkeys(k for row in table for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(table)
    return buffer.getvalue()
