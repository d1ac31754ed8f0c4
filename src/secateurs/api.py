"""The verbs: :func:`prune`, :func:`evaluate`, :func:`compare`.

>>> from secateurs import prune, PruneConfig, load_model, calibration_data
>>> model, tok = load_model()                                  # the built-in smollm2-135m
>>> cfg = PruneConfig(method="sparsegpt", pattern="2:4", calib_samples=32, calib_seqlen=512)
>>> result = prune(model, cfg, calibration_data(tok, cfg))
>>> result.sparsity, result.per_layer["model.layers.0.mlp.down_proj"]
"""

from __future__ import annotations

import json
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from datetime import datetime, timezone
from typing import Iterable, Sequence

import torch

from .allocator import give_back_freed_memory
from .config import (REFINE_OPTIONS, ConfigError, EvalConfig, PruneConfig, Recipe, StructuredConfig, check_device,
                     check_seqlen, check_token_ids)
from .data import calibration_windows, eval_windows, load_text, tokenize
from .engine import LayerRecord, WalkCheckpoint, make_plan, prune_with_data, prune_without_data
from .engine.allocation import allocation_of
from .engine.distributed import current as current_ranks
from .models.arch import check_streamed_model, find_blocks
from .models.experts import conceal
from .methods import METHODS
from .methods.base import option_table
from .eval import library_versions, machine, parameter_counts, peak_rss_bytes, perplexity
from .eval.report import parameter_counts_in
from .eval.tasks import ZeroShot, zero_shot as tasks_score
from .models.load import first_line
from .models.snapshot import WeightSnapshot, weight_bytes
from .progress import Stage, Tracker


@dataclass
class PruneResult:
    """What :func:`prune` did: per-layer records (measured from the weights) and timings."""

    configs: list
    layers: list = field(default_factory=list)  # LayerRecord, one per pruned weight matrix
    structured: list = field(default_factory=list)  # StructuredRecord, one per cut block (structured stages)
    block_scores: "list | None" = None  # blocks stage: the score of every block (or start) before removal
    prune_seconds: float = 0.0  # calibration capture to end of pruning
    stage_seconds: dict = field(default_factory=dict)
    stage: str = Stage.IDLE.value
    resumed_at_block: "int | None" = None  # a walk resumed from a checkpoint: the block this process started at
    untouched: dict = field(default_factory=dict)  # weights in scope left as they are (name -> count)
    untouched_zeros: int = 0  # zeros measured in them

    @property
    def zeros(self) -> int:
        return sum(r.zeros for r in self.layers)

    @property
    def numel(self) -> int:
        return sum(r.numel for r in self.layers)

    @property
    def sparsity(self) -> float:
        """Measured zeros / total over the weights in scope: the pruned matrices and any the engine left as they
        are (:attr:`untouched`; a mixture of experts' fused experts, say)."""
        total = self.numel + sum(self.untouched.values())
        return (self.zeros + self.untouched_zeros) / total if total else 0.0

    @property
    def per_layer(self) -> dict[str, float]:
        return {r.name: r.sparsity for r in self.layers}

    @property
    def experts(self) -> "dict | None":
        """A mixture of experts' pruned expert matrices: how many, and how many of them were pruned by
        magnitude because their expert was routed too few calibration tokens (None for other models)."""
        from .engine.sequential import MIN_EXPERT_TOKENS

        matrices = [r for r in self.layers if ".experts." in r.name]
        if not matrices:
            return None
        rare = sum(r.routed_tokens is not None and r.routed_tokens < MIN_EXPERT_TOKENS for r in matrices)
        return {"matrices": len(matrices), "by_magnitude": rare, "min_tokens": MIN_EXPERT_TOKENS}

    def to_dict(self) -> dict:
        return {
            "sparsity": self.sparsity,
            "pruned_weights": {"zeros": self.zeros, "total": self.numel},
            "prune_seconds": round(self.prune_seconds, 3),
            "stage": self.stage,
            "stage_seconds": self.stage_seconds,
            "per_layer": self.per_layer,
            "per_layer_detail": [
                {"name": r.name, "block": r.block, "role": r.role, "shape": list(r.shape), "target": r.target,
                 "pruned": r.pruned, "zeros": r.zeros, "numel": r.numel} for r in self.layers],
            **({"structured": [r.to_dict() for r in self.structured]} if self.structured else {}),
            **({"block_scores": self.block_scores} if self.block_scores is not None else {}),
            **({"resumed_at_block": self.resumed_at_block} if self.resumed_at_block is not None else {}),
            **({"untouched": self.untouched, "untouched_zeros": self.untouched_zeros} if self.untouched else {}),
            **({"experts": self.experts} if self.experts else {}),
        }


def _as_configs(config) -> list:
    if isinstance(config, (PruneConfig, StructuredConfig)):
        configs = [config]
    elif isinstance(config, Recipe):
        configs = list(config.stages)
    else:
        configs = list(config)
    if not configs or not all(isinstance(c, (PruneConfig, StructuredConfig)) for c in configs):
        raise ConfigError("prune() takes a PruneConfig, a StructuredConfig, a Recipe or a list of them")
    if any(getattr(c, "quant", "none") != "none" for c in configs[:-1]):
        raise ConfigError("quant applies to the last stage of a recipe: a later stage would move the weights off "
                          "their grid")
    return configs


def calibration_data(tokenizer, config: PruneConfig, ids: "torch.Tensor | None" = None, model=None) -> torch.Tensor:
    """Calibration windows ``(calib_samples, calib_seqlen)`` from the train split of ``config.calib_data``.

    For an encoder ``model`` whose ``calib_data`` is a ``.jsonl`` or ``.csv`` file of examples: the examples
    themselves, one per row, padded (:func:`~secateurs.data.labelled.calibration_examples`)."""
    from .data.labelled import calibration_examples, example_texts, is_labelled_file
    from .models.arch import head_of

    if ids is None and model is not None and head_of(model) != "causal" and is_labelled_file(config.calib_data):
        return calibration_examples(model, tokenizer, example_texts(config.calib_data), config.calib_samples,
                                    config.calib_seqlen, config.seed)
    if ids is not None:
        return calibration_windows(ids, config.calib_samples, config.calib_seqlen, config.seed)
    windows = calibration_windows(tokenize(tokenizer, load_text(config.calib_data, "train")), config.calib_samples,
                                  config.calib_seqlen, config.seed)
    give_back_freed_memory()  # the whole split's text and tokens (~0.3 GiB for enwiki), held by no one now
    return windows


def _as_ids(calibration, model) -> torch.Tensor:
    """The calibration as a ``(samples, seqlen)`` tensor of token ids the model can embed."""
    try:
        ids = calibration if isinstance(calibration, torch.Tensor) else torch.stack(
            [torch.as_tensor(x) for x in calibration])
    except (TypeError, ValueError, RuntimeError) as exc:  # text instead of ids, ragged rows, an empty list
        raise ConfigError(f"calibration must be token ids of shape (samples, seqlen) (see calibration_data): "
                          f"{first_line(exc)}") from None
    if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32) or ids.numel() == 0:
        raise ConfigError(f"calibration must be token ids of shape (samples, seqlen), got {tuple(ids.shape)} {ids.dtype}")
    check_seqlen(model, ids.shape[1], "calib_seqlen")
    check_token_ids(model, ids, "calibration")
    return ids.long()


def validate(model, config, calibration: "torch.Tensor | Iterable | None" = None) -> None:
    """Everything :func:`prune` checks before it changes a weight, changing nothing.

    Every config against the model (each pruned layer's shape against the pattern, the include, exclude and
    layer_sparsity rules against its layer names) and this machine (the compute device), and the calibration
    against the configs and the model's context.  Raises :class:`ConfigError` (or another ``ValueError``) with a one-line message.
    """
    try:
        _prepare(model, _as_configs(config), calibration)
    finally:
        conceal(model)


def _prepare(model, configs: list, calibration) -> tuple:
    """Validate as :func:`validate` says; return the calibration ids (or None) and the plans of the
    weight-pruning stages up to the first structured one (after it the shapes are new and the plan is made
    when the stage is reached)."""
    for device in {c.device for c in configs}:
        check_device(device)
    ids = None
    if any(c.needs_calibration for c in configs):
        if calibration is None:
            c = next(c for c in configs if c.needs_calibration)
            what = f"method {c.method}" + (f" with refine={c.refine}" if c.refine != "none" else "")
            raise ConfigError(f"{what} needs calibration data (token ids), none was given")
        ids = _as_ids(calibration, model)
        for c in configs:
            if c.needs_calibration:
                current_ranks().check_calibration(ids, c.batch_size)  # several processes: a batch for each
    plans: dict[int, object] = {}
    for k, c in enumerate(configs):
        if isinstance(c, StructuredConfig):  # the model's shapes change here: later stages are checked when reached
            from .structured import check_structured

            if current_ranks().world > 1:
                raise ConfigError("structured methods run in one process, not several")

            check_structured(model, c)
            break
        plans[k] = make_plan(model, c)
    return ids, plans


def check_checkpointable(config) -> None:
    """A walk's checkpoint serves one weight-pruning config that walks the blocks with calibration data;
    :class:`ConfigError` otherwise."""
    configs = _as_configs(config)
    if len(configs) != 1:
        raise ConfigError(f"a walk checkpoint serves one config, not a recipe of {len(configs)} stages")
    c = configs[0]
    if isinstance(c, StructuredConfig) or not c.needs_calibration:
        raise ConfigError(f"method {c.method} does not walk the blocks with calibration data: it has no walk to "
                          "checkpoint")
    if c.allocation == "global":
        raise ConfigError("allocation=global ranks every layer after the walk: its walk cannot be checkpointed")
    if c.allocation == "owl":
        raise ConfigError("allocation=owl sets every block's target from a walk of the dense model first: its "
                          "pruning walk cannot be checkpointed")
    if current_ranks().world > 1:
        raise ConfigError("a walk checkpoint (--save-every) serves one process, not several")


def walk_state_dir(output) -> Path:
    """Where a prune that saves to ``output`` keeps its walk's state: beside the output folder, not in it."""
    output = Path(output)
    return output.with_name(output.name + ".prune-state")


def walk_checkpoint(config, output, run: dict, every: "int | None" = None, resume: bool = True,
                    streamed: bool = False):
    """The :class:`~secateurs.engine.WalkCheckpoint` of a prune that saves to ``output``, or None.

    ``every``: save the walk every that many blocks.  A state an earlier run left there is resumed (when it was
    saved by the same ``run``, config and calibration; :meth:`WalkCheckpoint.start` checks) unless ``resume`` is
    False, which removes it.  A config whose walk cannot be checkpointed is refused, also when it would only
    find an old state there.  ``streamed``: for :func:`prune_streamed`, whose finished blocks' output shards
    wait in the state's folder.
    """
    folder = walk_state_dir(output)
    if not resume and folder.exists():
        shutil.rmtree(folder)
    if not every and not folder.exists():
        return None
    try:
        check_checkpointable(config)
    except ConfigError as exc:
        if every:
            raise
        raise ConfigError(f"{folder} holds a saved walk, which this run cannot resume ({exc}); give --no-resume "
                          "(resume=False) to remove it") from None
    if not streamed and _as_configs(config)[0].quant != "none":
        raise ConfigError("a walk saved from memory keeps the weights, not their quantization scales: --save-every "
                          "with --quant needs the streamed prune (drop --no-stream)")
    return WalkCheckpoint(folder, run, every=every, shards=streamed)


def walk_room(model, config, checkpoint) -> tuple[int, str]:
    """The disk a walk's checkpoints need beyond the model (see :mod:`.engine.checkpoint`), and what to call it
    all in an error: every block's weights once (a streamed walk's are the output's own shards, counted with the
    model), and two copies of one block's outputs while the newer replaces the older."""
    if checkpoint is None or checkpoint.every is None:
        return 0, "the model"
    width = model.get_input_embeddings().embedding_dim
    outputs = config.calib_samples * config.calib_seqlen * width * next(model.parameters()).element_size()
    blocks = 0 if checkpoint.shards else weight_bytes(model)
    return blocks + 2 * outputs, f"the model and the walk's state (--save-every {checkpoint.every})"


@torch.no_grad()
def prune(model, config, calibration: "torch.Tensor | Iterable | None" = None, *, progress: bool = True,
          tracker: "Tracker | None" = None, checkpoint=None) -> PruneResult:
    """Prune ``model`` in place.

    ``config`` is a :class:`PruneConfig` (weights), a :class:`StructuredConfig` (channels, heads, blocks),
    a :class:`Recipe` or a list of configs (stages, applied in order).  ``calibration`` holds token ids
    ``(samples, seqlen)`` (see :func:`calibration_data`); methods that need data refuse to run without it.

    Every config and layer is validated before any weight changes.  An error found part-way (a
    :class:`~secateurs.engine.CalibrationError` at block 5, say) leaves the blocks before it pruned in
    ``model``: reload the model before trying again.  (The CLI saves nothing in that case.)

    ``checkpoint`` (:class:`~secateurs.engine.WalkCheckpoint`, for one config that walks the blocks with
    calibration data, not ``group="global"``) saves the walk after finished blocks; given to a freshly loaded
    model after a crash, it resumes the walk after the last saved block, with the same end result.
    """
    configs = _as_configs(config)
    tracker = tracker or Tracker(show=progress)
    if checkpoint is not None:
        check_checkpointable(configs)
    try:  # planning exposes a mixture of experts' fused experts as linears; the model is given back as it was
        ids, plans = _prepare(model, configs, calibration)
        result = PruneResult(configs)
        start = time.perf_counter()
        records: dict[str, LayerRecord] = {}
        for k, cfg in enumerate(configs):
            if isinstance(cfg, StructuredConfig):
                from .structured import prune_structured

                conceal(model)
                _add_stage(result, records, cfg, [], *prune_structured(model, cfg, ids, tracker))
                continue
            plan = plans.get(k) or make_plan(model, cfg)
            method = cfg.build_method()
            if cfg.needs_calibration:
                done = prune_with_data(model, plan, method, cfg, ids, tracker, checkpoint)
            else:
                done = prune_without_data(plan, method, cfg, tracker)
            _add_stage(result, records, cfg, done)
            result.untouched.update(plan.untouched)
    finally:
        conceal(model)
    result.prune_seconds = time.perf_counter() - start
    weights = dict(model.named_parameters())
    result.untouched_zeros = sum(weights[n].numel() - int(torch.count_nonzero(weights[n])) for n in result.untouched)
    result.resumed_at_block = checkpoint.resumed_at if checkpoint is not None else None
    tracker.enter(Stage.COMPLETE)
    result.layers = list(records.values())
    result.stage_seconds = dict(tracker.seconds)
    result.stage = tracker.stage.value
    return result


def _add_stage(result: PruneResult, records: dict, cfg, done: list, cut=(), scores=None) -> None:
    """Add one stage's outcome: its layer records ``done`` into ``records`` (by name), a structured stage's
    cuts and block scores into ``result``."""
    if isinstance(cfg, StructuredConfig):
        result.structured += cut
        if scores is not None:
            result.block_scores = [float(x) for x in scores]
        records.clear()  # earlier records name weights whose shapes (or blocks) are gone
    records.update({r.name: r for r in done})  # a layer pruned by two stages keeps its last record


def evaluate(model, tokenizer, config: "EvalConfig | None" = None, ids: "torch.Tensor | None" = None,
             progress: bool = True) -> float:
    """The measure of ``model`` on the test split of ``config.data`` (see :class:`EvalConfig`): perplexity of a
    causal LM, accuracy of a sequence classifier (labelled data), pseudo-perplexity of a masked LM."""
    from .eval.encoders import accuracy, metric_of, pseudo_perplexity

    config = config or EvalConfig()
    metric = metric_of(model, config.metric)
    tracker = Tracker(show=progress)
    tracker.enter(Stage.EVALUATING)
    if metric == "accuracy":
        from .data.labelled import load_examples

        return accuracy(model, tokenizer, load_examples(config.data, "test"), config.batch_size)["accuracy"]
    if metric == "pseudo-perplexity":
        from .data.labelled import max_positions

        seqlen = min(config.seqlen, max_positions(model, tokenizer) - 2)
        if ids is None:
            ids = tokenize(tokenizer, load_text(config.data, "test"))
        ids = ids[~torch.isin(ids, torch.tensor(tokenizer.all_special_ids, dtype=ids.dtype))]  # text only
        windows = torch.cat([w for w, _ in eval_windows(ids, seqlen, config.windows)])
        return pseudo_perplexity(model, tokenizer, windows)
    return perplexity(model, tokenizer, config, ids=ids, tracker=tracker)


def environment() -> dict:
    """Where and when a figure was measured: library versions, the machine, and the UTC time of measurement."""
    return {"versions": library_versions(), "machine": machine(),
            "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def build_report(result: PruneResult, model, dense_ppl, ppl, eval_config: "EvalConfig | None", **extra) -> dict:
    """The ``--report`` JSON: figures measured in this run, the full config, seed and versions.  ``model`` is
    the pruned model, or the folder a streamed prune wrote it to."""
    counts = parameter_counts(model) if isinstance(model, torch.nn.Module) else parameter_counts_in(model)
    return {
        "dense_perplexity": dense_ppl,
        "perplexity": ppl,
        **result.to_dict(),
        **counts,
        "peak_rss_bytes": peak_rss_bytes(),  # of this process (rank 0 of several)
        "processes": current_ranks().world,
        "config": [_described(c) for c in result.configs] if len(result.configs) > 1 else _described(result.configs[0]),
        "seed": result.configs[0].seed,
        "eval": eval_config.to_dict() if eval_config else None,
        **environment(),
        **extra,
    }


def _described(config) -> dict:
    """A config as saved in a report: its fields, and the defaults they resolved to in this run."""
    resolved = getattr(config, "resolved", None)
    return {**config.to_dict(), **({"resolved": asdict(resolved)} if resolved is not None else {})}


def parse_setting(text: str) -> dict:
    """A compare column: ``"0.5"`` (unstructured at 50%), ``"2:4"`` or ``"block:16@0.5"``."""
    text = text.strip()
    try:
        return {"pattern": "unstructured", "sparsity": float(text)}
    except ValueError:
        pass
    pattern, _, sparsity = text.partition("@")
    return {"pattern": pattern, "sparsity": float(sparsity) if sparsity else None}


def parse_method(text: str) -> dict:
    """A compare row: ``"sparsegpt"`` or ``"sparsegpt+admm"`` (the method with ``refine="admm"``; ``+dsnot``
    likewise)."""
    method, plus, refine = text.strip().partition("+")
    return {"method": method, "refine": refine} if plus else {"method": method}


def compare_grid(methods: Sequence[str], settings: Sequence[str], base: "PruneConfig | dict | None" = None) -> list:
    """The cells of a comparison, ``[(method, setting, config)]``, each config validated; names must not repeat.

    Each cell's config is built as :func:`prune` would build it from ``base`` (the settings every cell shares)
    with the cell's method and pattern: defaults that depend on the method are the method's own.  A setting
    only some methods read (a method's option, ``group``, ``refine_iters``) goes to the cells that read it; one
    that no cell reads is refused.
    """
    for what, names in (("methods", methods), ("sparsities", settings)):
        if not names:
            raise ConfigError(f"{what}: name at least one")
        if twice := sorted({n for n in names if list(names).count(n) > 1}):
            raise ConfigError(f"{what} name {', '.join(map(repr, twice))} more than once: one column or row each")
    shared = _shared_settings(base)
    options = {**shared.pop("options", {}), **{k: shared.pop(k) for k in list(shared) if k in option_table()}}
    narrow = {k: shared.pop(k) for k in ("group", *REFINE_OPTIONS) if shared.get(k) is not None}
    cells, read = [], set()
    for m in methods:
        row = parse_method(m)
        cls = METHODS.get(row["method"])  # an unknown name is refused, with the known ones, by PruneConfig
        refine = row.get("refine", shared.get("refine", "none"))
        own_options = {k: v for k, v in options.items() if cls is not None and k in cls.options()}
        own = {k: v for k, v in narrow.items()
               if (refine in REFINE_OPTIONS[k] if k in REFINE_OPTIONS else cls is not None and v in cls.groups)}
        read.update(own_options, own)
        cells += [(m, s, PruneConfig.from_dict({**shared, **own, **row, **parse_setting(s), "options": own_options}))
                  for s in settings]
    if unread := [k for k in [*options, *narrow] if k not in read]:
        raise ConfigError(f"{', '.join(unread)}: read by none of the compared methods ({', '.join(methods)}); "
                          "drop it")
    return cells


def _shared_settings(base) -> dict:
    """The settings of ``base`` that every compare cell starts from: all but method, pattern and sparsity."""
    shared = base.to_dict() if isinstance(base, PruneConfig) else dict(base or {})
    if isinstance(base, PruneConfig):  # only what was given: a Wanda base's defaults must not reach SparseGPT
        defaults = PruneConfig(method=base.method).to_dict()
        shared = {k: v for k, v in shared.items() if v != defaults[k]}
    for key in ("method", "pattern", "sparsity"):
        shared.pop(key, None)
    return shared


@torch.no_grad()
def compare(model, tokenizer, methods: Sequence[str], settings: Sequence[str], base: "PruneConfig | dict | None" = None,
            eval_config: "EvalConfig | None" = None, progress: bool = True, on_row=None, checkpoint=None,
            previous: "dict | None" = None, dtype: "torch.dtype | None" = None, workdir=None,
            zero_shot: "ZeroShot | None" = None) -> dict:
    """Dense plus every method x setting on one model, same calibration windows and evaluation windows.

    A method may carry a weight reconstruction, ``"wanda+admm"``; without one it keeps ``base.refine``.
    ``model`` in memory is restored to its dense weights after every run, also one that fails; meanwhile they
    wait in a temporary file (:class:`~.models.snapshot.WeightSnapshot`), not in memory.  ``model`` may also be
    a safetensors folder (see :func:`stream_source`): then nothing is loaded whole -- each cell is pruned with
    :func:`prune_streamed` into a temporary folder under ``workdir`` (default: the system's temporary folder),
    evaluated with :func:`evaluate_streamed` and removed, and ``dtype`` (None: the checkpoint's own) is the
    model's dtype; the figures are those of the in-memory table.  Returns the table:
    ``{"dense_perplexity", "rows": [...], "base_config", "eval", "complete", ...}``.

    ``on_row(row)`` is called after each measured cell.  ``checkpoint(table)`` is called with the table so
    far (``"complete": False`` until the last cell) after the dense evaluation and after every cell, so that a
    caller who saves it loses nothing to a crash.  ``previous`` is such a saved table: its dense perplexity and
    its cells of this grid are kept and only the missing cells are measured.  It must have been made with the
    same base config and evaluation (:class:`ConfigError` otherwise); every cell is measured from the dense
    weights with the same windows, so a resumed table holds what an uninterrupted one would.

    ``zero_shot`` (:class:`~.eval.tasks.ZeroShot`, a model in memory only) adds lm-eval's scores of the dense
    model (``"dense_zero_shot"``) and of every cell (its row's ``"zero_shot"``).
    """
    eval_config = eval_config or EvalConfig()
    grid = compare_grid(methods, settings, base)
    table = {"methods": list(methods), "settings": list(settings), "dense_perplexity": None, "rows": [],
             "base_config": _as_json(_shared_settings(base)), "eval": _as_json(eval_config.to_dict()),
             "streamed": isinstance(model, (str, Path)), "complete": False,
             **({"tasks": zero_shot.to_dict()} if zero_shot else {})}
    if zero_shot is not None and table["streamed"]:
        raise ConfigError("zero-shot tasks score a model in memory: give a loaded model (--no-stream)")
    manager = zero_shot.task_manager() if zero_shot else None
    done = {}
    if previous is not None:
        _check_resumable(previous, table)
        table["dense_perplexity"] = previous.get("dense_perplexity")
        done = {(r["method"], r["setting"]): r for r in previous.get("rows", [])}
    todo = [(m, s, c) for m, s, c in grid if (m, s) not in done]
    keys = [(m, s) for m, s, _ in grid]

    def save():
        table["rows"] = [done[k] for k in keys if k in done]
        table.update(environment())
        if checkpoint:
            checkpoint(table)

    needs_data = any(c.needs_calibration for _, _, c in todo)
    calib = calibration_data(tokenizer, grid[0][2]) if needs_data else None  # the cells share the calib_ fields
    cells = _StreamedCells(model, tokenizer, dtype, workdir, progress) if isinstance(model, (str, Path)) else \
        _InMemoryCells(model, tokenizer, progress)
    for _, _, cfg in todo:  # against the model too, before an hour of cells ends on a typo in the last one
        cells.validate(cfg, calib)
    eval_ids = tokenize(tokenizer, load_text(eval_config.data, "test"))
    if table["dense_perplexity"] is None:
        table["dense_perplexity"] = cells.evaluate(None, eval_config, eval_ids)
        if zero_shot:
            table["dense_zero_shot"] = tasks_score(model, tokenizer, zero_shot, manager, progress)
        save()
    elif zero_shot:
        table["dense_zero_shot"] = previous.get("dense_zero_shot")
    score = (lambda: tasks_score(model, tokenizer, zero_shot, manager, progress)) if zero_shot else None
    if todo:
        with cells:
            for method, setting, cfg in todo:
                result, ppl, scores = cells.run(cfg, calib, eval_config, eval_ids, score)
                done[method, setting] = row = {
                    "method": method, "setting": setting, "pattern": cfg.pattern, "perplexity": ppl,
                    "sparsity": result.sparsity, "prune_seconds": round(result.prune_seconds, 3),
                    "peak_rss_bytes": peak_rss_bytes(), **({"zero_shot": scores} if zero_shot else {})}
                if on_row:
                    on_row(row)
                save()
    table["complete"] = True
    save()
    return table


class _InMemoryCells:
    """:func:`compare`'s cells on a model in memory: each pruned in place, evaluated, and given its dense
    weights back from a snapshot on disk (no second copy of the model in memory), also when it fails."""

    def __init__(self, model, tokenizer, progress):
        self.model, self.tokenizer, self.progress = model, tokenizer, progress

    def validate(self, cfg, calib):
        validate(self.model, cfg, calib)

    def evaluate(self, folder, eval_config, ids):
        return evaluate(self.model, self.tokenizer, eval_config, ids=ids, progress=self.progress)

    def __enter__(self):
        self.dense = WeightSnapshot(self.model).__enter__()
        return self

    def __exit__(self, *exc):
        return self.dense.__exit__(*exc)

    def run(self, cfg, calib, eval_config, ids, score=None):
        try:
            result = prune(self.model, cfg, calib, progress=self.progress)
            return result, self.evaluate(None, eval_config, ids), score() if score else None
        finally:
            self.dense.restore(self.model)  # the next cell, and the caller, get the dense model back


class _StreamedCells:
    """:func:`compare`'s cells on a safetensors folder: each pruned by :func:`prune_streamed` into a temporary
    folder, evaluated from there, and removed."""

    def __init__(self, source, tokenizer, dtype, workdir, progress):
        from .models.stream import open_streamed

        self.source, self.tokenizer, self.dtype, self.progress = Path(source), tokenizer, dtype, progress
        self.workdir = workdir
        self.skeleton, _ = open_streamed(source, dtype)
        check_streamed_model(self.skeleton)

    def validate(self, cfg, calib):
        check_streamable(cfg)
        validate(self.skeleton, cfg, calib)

    def evaluate(self, folder, eval_config, ids):
        return evaluate_streamed(folder or self.source, self.tokenizer, eval_config, ids, self.dtype,
                                 progress=self.progress)

    def __enter__(self):
        import tempfile

        self.tmp = tempfile.TemporaryDirectory(prefix="secateurs-compare-", dir=self.workdir)
        return self

    def __exit__(self, *exc):
        self.tmp.cleanup()

    def run(self, cfg, calib, eval_config, ids, score=None):
        cell = Path(self.tmp.name) / "cell"
        try:
            result = prune_streamed(self.source, cfg, calib, cell, dtype=self.dtype, progress=self.progress,
                                    save_format="sparse" if cfg.quant != "none" else "dense")  # codes need it
            return result, self.evaluate(cell, eval_config, ids), None
        finally:
            shutil.rmtree(cell, ignore_errors=True)


def read_table(path, model: "str | None" = None) -> "dict | None":
    """A compare table saved by an interrupted run (``checkpoint`` writes it), to give to :func:`compare` as
    ``previous``; None when ``path`` does not exist yet.  ``model``: refuse a table of another model."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot resume from {path}: {first_line(exc)}") from None
    if not isinstance(table, dict) or "rows" not in table:
        raise ConfigError(f"cannot resume from {path}: it is not a table written by secateurs compare")
    if model is not None and table.get("model") != model:
        raise ConfigError(f"cannot resume: {path} is a table of model {table.get('model')!r}, not {model!r}")
    return table


def _as_json(value):
    """``value`` as it reads back from JSON (tuples become lists), so saved and fresh tables compare equal."""
    return json.loads(json.dumps(value))


def _check_resumable(previous: dict, table: dict) -> None:
    """Refuse to mix cells measured under another calibration or evaluation into this table."""
    for key in ("base_config", "eval", "tasks"):
        old, new = previous.get(key) or {}, table.get(key) or {}
        differ = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if differ:
            shown = ", ".join(f"{k}={old.get(k)!r} there, {new.get(k)!r} here" for k in differ)
            raise ConfigError(f"cannot resume: the saved table was made with other settings ({shown})")


def markdown_table(table: dict) -> str:
    """Perplexity pivot in the papers' layout: one row per method, one column per sparsity setting.

    Cells not measured yet (a table saved mid-run) show a dash."""
    settings = table.get("settings") or list(dict.fromkeys(r["setting"] for r in table["rows"]))
    methods = table.get("methods") or list(dict.fromkeys(r["method"] for r in table["rows"]))
    cell = {(r["method"], r["setting"]): r for r in table["rows"]}
    head = "| method | " + " | ".join(settings) + " |"
    lines = [head, "|" + "---|" * (len(settings) + 1), "| dense | " + " | ".join(
        f"{table['dense_perplexity']:.2f}" for _ in settings) + " |"]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(
            f"{cell[(m, s)]['perplexity']:.2f}" if (m, s) in cell else "–" for s in settings) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- streamed


def prune_streamed(source, config, calibration, output, *, dtype: "torch.dtype | None" = None, tokenizer=None,
                   extra_files=None, finishing=None, overwrite: bool = False, progress: bool = True,
                   tracker: "Tracker | None" = None, checkpoint=None, save_format: str = "dense") -> PruneResult:
    """Prune the safetensors checkpoint in folder ``source`` into folder ``output``, one block in memory at a time.

    The model is never loaded whole: its skeleton has no weights (``meta``), each block is read from the
    (memory-mapped, possibly sharded) files when the walk reaches it, pruned, written to its own output shard
    and freed; tensors the walk does not change are copied.  ``dtype`` None keeps the checkpoint's own; the
    method's math runs in float32 whatever it is.  The output (written atomically, with
    ``model.safetensors.index.json``, the config, ``tokenizer`` if given and ``extra_files``) loads in plain
    transformers and holds the weights :func:`prune` gives the same model in memory.  ``finishing(folder,
    result)``, if given, runs once the model is written but before the folder is moved into place, and returns
    more files to write there (the command line evaluates the pruned model and writes its report so).

    ``config`` may be a recipe of several weight-pruning stages: each stage streams the model the stage before
    wrote (into a folder inside the output's temporary sibling, removed once read), so the disk holds two
    models at a time.  ``checkpoint`` (one stage only; a :class:`~secateurs.engine.WalkCheckpoint` made with
    ``shards=True``, see :func:`walk_checkpoint`) saves the walk after finished blocks, whose output shards
    wait in its folder until the walk ends; a prune stopped part-way and run again resumes after the last saved
    block.

    Structured stages stream too: channels and heads cut each block as it is read and write the smaller one;
    blocks are scored streamed, then the kept ones are copied, renumbered.  A ranking allocation (``global``,
    of weights or of structured widths) is not streamed (:func:`prune` it in memory).

    ``save_format`` ``sparse`` stores the pruned weights compressed (:mod:`secateurs.export.compressed`)
    before ``finishing`` runs; ``dense`` (the default) is what plain transformers loads.
    """
    from .export.compressed import check_format, compress_folder, compressible
    from .models.load import check_space, written_folder
    from .models.stream import open_streamed

    configs = _as_configs(config)
    check_streamable(configs)
    check_format(save_format, configs)
    if checkpoint is not None:
        check_checkpointable(configs)
        if not checkpoint.shards:
            raise ConfigError("a streamed prune's walk checkpoint keeps the output's shards: make it with "
                              "shards=True (walk_checkpoint(..., streamed=True))")
    model, weights = open_streamed(source, dtype)
    check_streamed_model(model)
    dtype = dtype or weights.stored_dtype
    tracker = tracker or Tracker(show=progress)
    ids, plans = _prepare(model, configs, calibration)
    ranks = current_ranks()  # several processes (torchrun): rank 0 writes, every rank walks its share
    check_space(output, None, extra=streamed_room(weights, dtype) * min(len(configs), 2), what="the model")
    start = time.perf_counter()
    records: dict[str, LayerRecord] = {}
    result = PruneResult(configs)
    with written_folder(output, overwrite) if ranks.main else nullcontext() as folder:
        read_from = None
        for k, cfg in enumerate(configs):
            last = k == len(configs) - 1
            plan = plans.get(k)  # validated on the first skeleton, up to the first structured stage
            if k:  # the stage before wrote the model this one prunes: a new skeleton, its plan
                model, weights = open_streamed(read_from, dtype)
                if isinstance(cfg, StructuredConfig):
                    from .structured import check_structured

                    check_structured(model, cfg)
                else:
                    plan = make_plan(model, cfg)
            into = folder if last else folder / f"stage-{k + 1}"
            _add_stage(result, records, cfg, *_stream_stage(model, weights, plan, cfg, ids, into, dtype, tracker,
                                                            checkpoint if last else None))
            if plan is not None and not isinstance(cfg, StructuredConfig):
                result.untouched.update(plan.untouched)
            if read_from is not None:
                weights.unmap()
                shutil.rmtree(read_from)
            read_from = into
        result.prune_seconds = time.perf_counter() - start
        result.layers = list(records.values())
        if ranks.main and result.untouched:  # the zeros of what was left as it is, as written
            from .models.stream import Checkpoint

            written = Checkpoint(folder)
            result.untouched_zeros = sum(chunk.numel() - int(torch.count_nonzero(chunk))
                                         for name in result.untouched for chunk in written.chunks(name))
        if ranks.main and tokenizer is not None:
            tokenizer.save_pretrained(folder)
        if ranks.main and save_format == "sparse":
            compress_folder(folder, compressible(result))
        tracker.enter(Stage.COMPLETE)  # the model is written: what finishing does is measuring it
        result.stage_seconds, result.stage = dict(tracker.seconds), tracker.stage.value
        result.resumed_at_block = checkpoint.resumed_at if checkpoint is not None else None
        more = finishing(ranks.from_main(folder), result) if finishing is not None else {}
        ranks.wait_for_all()  # every rank is done reading the written folder before rank 0 moves it into place
        if ranks.main:
            for name, text in {**(extra_files or {}), **more}.items():
                (folder / name).write_text(text)
    return result


def _stream_stage(model, weights, plan, cfg, ids, into, dtype, tracker, checkpoint) -> tuple[list, list, list]:
    """One stage of :func:`prune_streamed`: walk the blocks of the skeleton ``model`` read from ``weights``,
    writing the pruned model (shards, index, config) into folder ``into`` (on rank 0).  Returns the stage's
    layer records, structured records and block scores (the last two for a structured stage)."""
    from .models.stream import BlockStream, ShardWriter
    from .structured import prune_structured

    main = current_ranks().main
    if main:
        into.mkdir(exist_ok=True)
        if checkpoint is not None:  # the finished blocks wait with the walk's state, where a crash leaves them
            checkpoint.folder.mkdir(parents=True, exist_ok=True)
    blocks_name, blocks = find_blocks(model)
    n_blocks = len(blocks)
    depth = isinstance(cfg, StructuredConfig) and cfg.method == "blocks"
    # removing whole blocks scores them all before it knows which to keep: it writes once they are chosen
    writer = ShardWriter(into if checkpoint is None else checkpoint.folder, n_blocks + 1) if main and not depth \
        else None
    stream = BlockStream(model, weights, dtype, blocks_name, writer)
    records, cut, scores = [], [], None
    if isinstance(cfg, StructuredConfig):
        cut, scores = prune_structured(model, cfg, ids, tracker, stream)
    elif cfg.needs_calibration:
        records = prune_with_data(model, plan, cfg.build_method(), cfg, ids, tracker, checkpoint, source=stream)
    else:
        records = prune_without_data(plan, cfg.build_method(), cfg, tracker, source=stream)
    tracker.enter(Stage.EXPORTING)
    if main:
        if depth:
            removed = {r.block for r in cut}
            stream.writer = ShardWriter(into, n_blocks - len(removed) + 1)
            stream.copy_renumbered([i for i in range(n_blocks) if i not in removed])
        else:
            stream.writer.move_to(into)
            stream.copy_the_rest(n_blocks)
        stream.writer.finish()
        model.config.dtype = dtype
        model.config.save_pretrained(into)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(into)
    return records, cut, scores


def check_streamable(config) -> None:
    """:class:`ConfigError` unless :func:`prune_streamed` can run ``config``: no stage that ranks every layer
    at once (a global allocation, of weights or of structured widths), and several stages in one process only
    (each stage reads the folder the one before wrote, which rank 0 alone writes)."""
    configs = _as_configs(config)
    if any(c.allocation == "global" if isinstance(c, StructuredConfig) else allocation_of(c).ranks
           for c in configs):
        raise ConfigError("allocation=global ranks every layer at once, which is not streamed: prune in memory")
    if any(isinstance(c, StructuredConfig) and c.method == "slicegpt" for c in configs):
        raise ConfigError("slicegpt rotates every weight once the whole stream is measured, which is not streamed: "
                          "prune in memory")
    if len(configs) > 1 and current_ranks().world > 1:
        raise ConfigError("a streamed recipe of several stages runs in one process: prune it in memory")


def streamed_room(checkpoint, dtype: "torch.dtype | None") -> int:
    """The disk a streamed prune of ``checkpoint`` writes (its tensors in ``dtype``; zeros take the room of the
    weights they replace), plus 16 MiB for the tokenizer, config and report."""
    return checkpoint.size_in(dtype) + 16 * 2**20


def stream_source(model: "str | None", config) -> "Path | None":
    """The safetensors folder from which :func:`prune_streamed` would prune ``model`` (a folder or built-in name)
    with ``config``, or None where the whole model must be loaded: a hub id, per-block widths, or a config
    :func:`check_streamable` refuses (a ranking allocation; a recipe of several stages in several processes)."""
    from .models.load import streamable

    try:
        check_streamable(config)
    except ConfigError:
        return None
    return streamable(model)


def evaluate_streamed(source, tokenizer, config: "EvalConfig | None" = None, ids: "torch.Tensor | None" = None,
                      dtype: "torch.dtype | None" = None, progress: bool = True) -> float:
    """:func:`evaluate` of the checkpoint in folder ``source`` without loading it whole: every evaluation window
    goes through one block at a time, read from disk (the same figure as in memory, to the last bit)."""
    from .eval.perplexity import perplexity_streamed
    from .models.stream import BlockStream, open_streamed

    if config is not None and config.metric not in (None, "perplexity"):
        raise ConfigError(f"{config.metric} does not apply to a causal language model, which is measured by "
                          "perplexity")
    model, checkpoint = open_streamed(source, dtype)
    check_streamed_model(model)
    blocks_name, _ = find_blocks(model)
    tracker = Tracker(show=progress)
    tracker.enter(Stage.EVALUATING)
    stream = BlockStream(model, checkpoint, dtype or checkpoint.stored_dtype, blocks_name)
    return perplexity_streamed(model, stream, tokenizer, config or EvalConfig(), ids=ids, tracker=tracker)
