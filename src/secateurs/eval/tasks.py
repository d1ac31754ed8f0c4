"""Zero-shot accuracy through lm-eval-harness (the optional dependency ``secateurs[eval]``).

The model in memory is handed to lm-eval's own Hugging Face wrapper (``HFLM(pretrained=model)``): no save and
reload.  Tasks come from lm-eval's registry, plus any task YAML under ``include_path``; a standard task
(hellaswag, arc_easy, piqa, boolq, winogrande, lambada_openai, ...) runs wherever its data set is reachable or
cached.  Scores are lm-eval's, with its standard errors.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError

INSTALL = "zero-shot tasks need lm-eval: pip install 'secateurs[eval]'"


def _lm_eval():
    try:
        import lm_eval
    except ImportError:
        raise ConfigError(INSTALL) from None
    return lm_eval


@dataclass(frozen=True)
class ZeroShot:
    """Which lm-eval tasks to score a model on, and how much of each."""

    tasks: tuple  # task (or group) names from lm-eval's registry or include_path
    include_path: "str | None" = None  # a folder of extra task YAMLs
    limit: "int | None" = None  # at most this many examples of each task (None: all)
    batch_size: int = 8

    def __post_init__(self):
        if isinstance(self.tasks, str) or not self.tasks or not all(isinstance(t, str) and t for t in self.tasks):
            raise ConfigError(f"tasks: name at least one lm-eval task (a list of names), got {self.tasks!r}")
        object.__setattr__(self, "tasks", tuple(self.tasks))
        if self.limit is not None and (isinstance(self.limit, bool) or not isinstance(self.limit, int)
                                       or self.limit < 1):
            raise ConfigError(f"limit must be a whole number of examples >= 1, got {self.limit!r}")
        if self.batch_size < 1:
            raise ConfigError(f"zero-shot batch_size must be >= 1, got {self.batch_size}")
        if self.include_path is not None and not Path(self.include_path).is_dir():
            raise ConfigError(f"include_path {self.include_path!r} is not a folder of task YAMLs")

    @classmethod
    def from_dict(cls, data: dict) -> "ZeroShot":
        if not isinstance(data, dict):
            raise ConfigError(f"zero_shot must be a mapping (tasks, include_path, limit), got {data!r}")
        known = {"tasks", "include_path", "limit", "batch_size"}
        if unknown := sorted(set(data) - known):
            raise ConfigError(f"unknown zero_shot field(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        tasks = data.get("tasks")
        return cls(**{**data, "tasks": tasks.split(",") if isinstance(tasks, str) else tasks})

    def to_dict(self) -> dict:
        return {"tasks": list(self.tasks), "include_path": self.include_path, "limit": self.limit,
                "batch_size": self.batch_size}

    def task_manager(self):
        """lm-eval's registry with ``include_path``; every task name checked against it (one line for all
        unknown names, with the nearest known ones)."""
        lm_eval = _lm_eval()
        from lm_eval.tasks import TaskManager

        manager = _registry(self.include_path, False) if self.include_path else None
        if manager is None or not set(self.tasks) <= set(manager.all_tasks):
            manager = _registry(self.include_path, True)
        known = set(manager.all_tasks)
        if unknown := [t for t in self.tasks if t not in known]:
            near = sorted({m for t in unknown for m in difflib.get_close_matches(t, known, n=3)})
            hint = f" (close: {', '.join(near)})" if near else ""
            raise ConfigError(f"lm-eval {lm_eval.__version__} knows no task {', '.join(map(repr, unknown))}{hint}; "
                              "give a registered name or a folder of task YAMLs with --include-path")
        return manager


@functools.lru_cache(maxsize=4)
def _registry(include_path: "str | None", defaults: bool):
    """lm-eval's task index, built once per process: indexing its ~15,000 built-in tasks takes seconds, so
    tasks found under ``include_path`` alone are served by an index of that folder."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=defaults)


@contextlib.contextmanager
def _environment(**values):
    """Environment variables set for the duration, then given back their former values."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def zero_shot(model, tokenizer, config: ZeroShot, manager=None, progress: bool = True) -> dict:
    """Score ``model`` (in memory, as it is now) on ``config.tasks``: ``{task: {metric: value,
    metric_stderr: value, "samples": n}}`` for every task lm-eval reports (a group's members too).

    lm-eval's own messages go to stderr (its progress bars only with ``progress``), so that stdout keeps this
    program's results."""
    lm_eval = _lm_eval()
    from lm_eval.models.huggingface import HFLM

    manager = manager or config.task_manager()
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # e.g. that it was handed a model, not a name
    was_training = model.training
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=config.batch_size)
    # lm-eval bootstraps some standard errors (perplexity, f1, ...) in a forked pool, which can hang a process
    # whose torch threads hold locks at the fork: in this process instead
    quiet = {} if progress else {"TQDM_DISABLE": "1"}
    try:
        with _environment(DISABLE_MULTIPROC="1", **quiet), contextlib.redirect_stdout(sys.stderr):
            out = lm_eval.simple_evaluate(model=lm, tasks=list(config.tasks), task_manager=manager,
                                          limit=config.limit, log_samples=False)
    finally:
        model.train(was_training)
    scores = {}
    for task, values in out["results"].items():
        row = {}
        for key, value in values.items():
            metric, _, filt = key.partition(",")
            if filt and isinstance(value, (int, float)) and not isinstance(value, bool):
                row[metric] = float(value)
        if row:
            row["samples"] = int(out.get("n-samples", {}).get(task, {}).get("effective", values.get("sample_len", 0))
                                 or 0)
            scores[task] = row
    return scores


def headline(scores: dict) -> dict:
    """One figure per task for tables: ``acc_norm`` where lm-eval gives it, else ``acc``, else its first metric;
    ``{task: (metric, value, stderr)}``."""
    out = {}
    for task, row in scores.items():
        metric = next((m for m in ("acc_norm", "acc") if m in row),
                      next((m for m in row if not m.endswith("_stderr") and m != "samples"), None))
        if metric is not None:
            out[task] = (metric, row[metric], row.get(f"{metric}_stderr"))
    return out
