"""Sparsity schedules: pure functions of the step, registered by name.

Every schedule maps a training step ``t`` to a target sparsity.  Schedules that ramp (``gradual``, ``cubic``,
``exponential``) change value only at update steps ``start_step + k * frequency`` and hold it in between;
before ``start_step`` the target is 0, from ``end_step`` on it is ``final_sparsity``.  With ``p`` the progress
``(t_u - start_step) / (end_step - start_step)`` at the last update step ``t_u``:

* ``oneshot``      -- 0 before ``start_step``, ``final_sparsity`` at and after it;
* ``gradual``      -- linear: ``s_i + (s_f - s_i) p``;
* ``cubic``        -- Zhu & Gupta (2017): ``s_f + (s_i - s_f)(1 - p)^3`` (fast early, gentle late);
* ``exponential``  -- saturating: ``s_f (1 - e^(-k p))`` (it ends at ``s_f (1 - e^(-k))``: 99.3% of ``s_f``
  for the default ``k = 5``);
* ``geometric``    -- ``s_0 (s_f / s_0)^p``: the sparsity grows by the same factor at every update, the usual
  choice for iterative prune-retrain cycles (``s_0 = initial_sparsity > 0``).

Going from sparsity ``s`` to ``s'`` removes :func:`increment` ``= (s' - s) / (1 - s)`` of the remaining weights,
so the measured sparsity equals the schedule's value at every update.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import asdict, dataclass
from typing import Callable

SCHEDULES: dict[str, Callable] = {}


def register_schedule(name: str):
    def wrap(fn):
        if name in SCHEDULES:
            raise ValueError(f"schedule {name!r} is registered twice")
        SCHEDULES[name] = fn
        return fn

    return wrap


def increment(current: float, target: float) -> float:
    """Fraction of the *remaining* weights to prune to go from sparsity ``current`` to ``target``."""
    if target <= current:
        return 0.0
    return (target - current) / (1 - current)


def _progress(step: int, start: int, end: int, frequency: int) -> float:
    """Progress in [0, 1] at the last update step at or before ``step`` (updates every ``frequency`` steps)."""
    if end <= start:
        return 1.0
    t = min(step, end)
    t = start + ((t - start) // frequency) * frequency if t < end else end
    return (t - start) / (end - start)


@register_schedule("oneshot")
def oneshot(step, *, start_step=0, final_sparsity, **_):
    return final_sparsity if step >= start_step else 0.0


@register_schedule("gradual")
def gradual(step, *, start_step, end_step, initial_sparsity, final_sparsity, frequency=1, **_):
    if step < start_step:
        return 0.0
    p = _progress(step, start_step, end_step, frequency)
    return initial_sparsity + (final_sparsity - initial_sparsity) * p


@register_schedule("cubic")
def cubic(step, *, start_step, end_step, initial_sparsity, final_sparsity, frequency=1, **_):
    if step < start_step:
        return 0.0
    p = _progress(step, start_step, end_step, frequency)
    return final_sparsity + (initial_sparsity - final_sparsity) * (1 - p) ** 3


@register_schedule("exponential")
def exponential(step, *, start_step, end_step, final_sparsity, frequency=1, k=5.0, **_):
    if step < start_step:
        return 0.0
    p = _progress(step, start_step, end_step, frequency)
    return final_sparsity * (1 - math.exp(-k * p))


@register_schedule("geometric")
def geometric(step, *, start_step, end_step, initial_sparsity, final_sparsity, frequency=1, **_):
    if step < start_step:
        return 0.0
    p = _progress(step, start_step, end_step, frequency)
    return initial_sparsity * (final_sparsity / initial_sparsity) ** p


def schedule_reads(name: str) -> set:
    """The parameters the schedule ``name`` reads (none for an unknown name)."""
    return set(inspect.signature(SCHEDULES[name]).parameters) - {"step", "_"} if name in SCHEDULES else set()


@dataclass(frozen=True)
class Schedule:
    """A named schedule with its parameters, validated; ``schedule(step)`` gives the target sparsity.

    Parameters left ``None`` take their default where they are read (:attr:`parameters`); one given to a
    schedule that does not read it (``k`` with ``cubic``) is refused rather than silently ignored.
    """

    name: str = "cubic"
    final_sparsity: float = 0.5
    initial_sparsity: "float | None" = None  # None = 0 (geometric needs one > 0)
    start_step: int = 0
    end_step: "int | None" = None  # None = start_step (a oneshot schedule needs no end)
    frequency: "int | None" = None  # update the target every N steps; None = every step
    k: "float | None" = None  # exponential: steepness; None = 5

    def __post_init__(self):
        from ..errors import ConfigError

        def check(cond, msg):
            if not cond:
                raise ConfigError(msg)

        check(self.name in SCHEDULES, f"schedule: unknown {self.name!r}; known: {', '.join(sorted(SCHEDULES))}")
        unread = [f for f in ("initial_sparsity", "end_step", "frequency", "k") if getattr(self, f) is not None
                  and f not in schedule_reads(self.name)]
        check(not unread, f"the {self.name} schedule does not read {', '.join(unread)}: drop it")
        p = self.parameters
        check(0 <= p["initial_sparsity"] < 1 and 0 < self.final_sparsity < 1,
              "schedule sparsities must be in [0, 1) (final > 0)")
        check(p["initial_sparsity"] <= self.final_sparsity, "initial_sparsity must not exceed final_sparsity")
        check(self.start_step >= 0 and p["end_step"] >= self.start_step, "need 0 <= start_step <= end_step")
        check(p["frequency"] >= 1, "frequency must be >= 1")
        check(p["k"] > 0, "k must be > 0")
        check(self.name != "geometric" or p["initial_sparsity"] > 0, "geometric needs initial_sparsity > 0")

    @property
    def parameters(self) -> dict:
        """Every parameter with its default filled in (the schedule function reads those it names)."""
        given = {k: v for k, v in asdict(self).items() if v is not None and k != "name"}
        return {"initial_sparsity": 0.0, "end_step": self.start_step, "frequency": 1, "k": 5.0, **given}

    def __call__(self, step: int) -> float:
        return SCHEDULES[self.name](step, **self.parameters)

    def is_update_step(self, step: int) -> bool:
        """Steps at which the target may change (masks are recomputed only there)."""
        if self.name == "oneshot":
            return step == self.start_step
        p = self.parameters
        return self.start_step <= step <= p["end_step"] and (
            (step - self.start_step) % p["frequency"] == 0 or step == p["end_step"])

    def to_dict(self) -> dict:
        return asdict(self)
