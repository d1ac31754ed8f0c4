"""Iterative prune-retrain: prune a little, retrain, prune more -- with a checkpoint after every cycle.

For each cycle ``c`` with target sparsity ``s_c`` (a list, or a schedule evaluated at ``c = 1..cycles``)::

    evaluate                       -> perplexity before pruning
    prune to s_c (any one-shot method and pattern of secateurs.prune; weights already zero score lowest,
                  so the earlier mask is kept and only survivors are added)
    evaluate                       -> perplexity after pruning
    retrain K steps, mask frozen   (training.finetune.train; data seeded by (seed, cycle))
    evaluate                       -> perplexity after retraining
    save  OUTPUT/cycle-NNN/        model + tokenizer + history.json, written atomically

A run that is interrupted resumes from the last complete ``cycle-NNN`` folder; because every cycle's
randomness comes from ``(seed, cycle)`` and the optimizer is created fresh each cycle, the resumed run ends
with exactly the weights of an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import replace
from pathlib import Path


from ..errors import ConfigError
from ..progress import Stage, Tracker
from .finetune import TrainConfig, train
from .masks import measured_sparsity, prunable_linears
from .schedules import Schedule

log = logging.getLogger(__name__)
CYCLE = re.compile(r"cycle-(\d{3})$")


def cycle_sparsities(cycles: int, final: float, schedule: str = "geometric", initial: "float | None" = None) -> list:
    """Targets for cycles ``1..cycles``: the schedule run from ``initial`` (cycle 1, default ``final / cycles``)
    to ``final`` (last cycle).  ``geometric`` (default) multiplies the sparsity by the same factor every cycle.
    """
    if cycles < 1:
        raise ConfigError("cycles must be >= 1")
    if initial is None:
        initial = final / cycles
    if cycles == 1:
        return [final]
    sched = Schedule(name=schedule, initial_sparsity=initial, final_sparsity=final, start_step=1, end_step=cycles)
    return [sched(c) for c in range(1, cycles + 1)]


def cycle_targets(sparsities: "list | None" = None, cycles: "int | None" = None, final: "float | None" = None,
                  initial: "float | None" = None, schedule: "str | None" = None) -> list:
    """Every cycle's target: the ``sparsities`` listed, or ``cycles`` of them scheduled up to ``final`` (from
    ``initial``, by ``schedule``: see :func:`cycle_sparsities`).  Refuses a mix of both, and targets that fall."""
    if (sparsities is None) == (cycles is None):
        raise ConfigError("give the sparsities of every cycle, or a number of cycles with a final sparsity")
    if sparsities is not None:
        if extra := [k for k, v in (("final_sparsity", final), ("initial_sparsity", initial),
                                    ("cycle_schedule", schedule)) if v is not None]:
            raise ConfigError(f"{', '.join(extra)} go(es) with a number of cycles, not with sparsities listed for "
                              "every cycle")
        targets = list(sparsities)
    else:
        if final is None:
            raise ConfigError("a number of cycles needs a final sparsity")
        targets = cycle_sparsities(cycles, final, schedule or "geometric", initial)
    if not targets:
        raise ConfigError("no cycle: give at least one sparsity")
    if any(b < a for a, b in zip(targets, targets[1:])):
        raise ConfigError(f"cycle sparsities must not decrease: {targets}")
    return targets


def cycle_config(prune_config, target: float):
    """The config of the cycle with ``target``: an N:M pattern fixes its own sparsity, every cycle the same."""
    return prune_config if prune_config.pattern_value.kind == "nm" else prune_config.override(sparsity=target)


def check_room(model, output, cycles: int, resume: bool = True) -> None:
    """Every cycle keeps its model: refuse to start unless there is room for each one still to run (one that
    ``resume=False`` would replace counts too)."""
    from ..models.load import check_space
    from ..models.snapshot import weight_bytes

    done = last_complete_cycle(Path(output)) if resume else None
    left = cycles - (done[0] if done else 0)
    if left > 0:
        check_space(Path(output) / f"cycle-{cycles - left + 1:03d}", model,
                    extra=(left - 1) * weight_bytes(model) + left * 16 * 2**20,
                    what=f"the model of {left} cycle(s)" if left > 1 else "the model")


def last_complete_cycle(output: Path) -> "tuple[int, Path] | None":
    done = sorted((int(m[1]), p) for p in output.glob("cycle-*") if (m := CYCLE.search(p.name))
                  and (p / "history.json").exists())
    return done[-1] if done else None


def iterate(model, tokenizer, prune_config, sparsities: list, train_config: TrainConfig, output,
            calibration=None, train_ids=None, evaluate=None, resume: bool = True, progress: bool = True,
            stop_after: "int | None" = None, load=None) -> list[dict]:
    """Run the cycles (see the module docstring); returns the history, one dict per cycle.

    ``evaluate(model) -> perplexity``.  ``load(path) -> model`` reloads a checkpoint when resuming (default:
    ``secateurs.load``).  ``stop_after`` ends the run after that many cycles of this call (to test resuming).
    """
    from .. import atomic
    from ..api import prune, validate
    from ..config import check_seqlen
    from ..models.load import save_model

    if prune_config.quant != "none":  # training would move the weights off their grid
        raise ConfigError("iterate retrains the weights after every cycle, off any integer grid: quantize the "
                          "final model with prune --quant instead")
    for target in sparsities:  # fail before the first cycle, not in the middle of one
        validate(model, cycle_config(prune_config, target), calibration)
    check_seqlen(model, train_config.seqlen, "training seqlen")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    history: list[dict] = []
    first = 1
    found = last_complete_cycle(output) if resume else None
    if found:
        cycle, path = found
        if load is None:
            from ..structured import load as load_saved

            def load(p):
                return load_saved(p)[0]

        loaded = load(path)
        model.load_state_dict(loaded.state_dict())
        history = json.loads((path / "history.json").read_text())
        first = cycle + 1
        log.info("resuming after cycle %d from %s", cycle, path)
    names = list(prunable_linears(model))
    ran = 0
    for c in range(first, len(sparsities) + 1):
        if stop_after is not None and ran >= stop_after:
            break
        t = time.perf_counter()
        target = sparsities[c - 1]
        entry = {"cycle": c, "target_sparsity": target}
        if evaluate:
            entry["perplexity_before"] = evaluate(model)
        cfg = cycle_config(prune_config, target)
        tracker = Tracker(show=progress)
        result = prune(model, cfg, calibration, tracker=tracker, progress=progress)
        entry["sparsity"] = measured_sparsity(model, names)
        entry["pruned_layers_sparsity"] = result.sparsity
        if evaluate:
            entry["perplexity_pruned"] = evaluate(model)
        hist = train(model, train_ids, replace(train_config, seed=train_config.seed * 1000 + c), tracker=tracker,
                     progress=progress)
        entry["train_loss"] = hist.loss
        entry["sparsity_after_training"] = measured_sparsity(model, names)
        if evaluate:
            entry["perplexity_retrained"] = evaluate(model)
        entry["seconds"] = round(time.perf_counter() - t, 2)
        history.append(entry)
        tracker.enter(Stage.EXPORTING)
        save_model(model, tokenizer, output / f"cycle-{c:03d}", overwrite=True,
                   extra_files={"history.json": json.dumps(history, indent=2) + "\n"})
        atomic.write_text(output / "history.json", json.dumps(history, indent=2) + "\n")
        ran += 1
        log.info("cycle %d: sparsity %.4f, perplexity %s", c, entry["sparsity"], entry.get("perplexity_retrained"))
    return history
