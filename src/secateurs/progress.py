"""The pipeline stage value, recorded in the report and shown in the progress bars."""

from __future__ import annotations

import enum
import sys
import time

from tqdm.auto import tqdm


class Stage(str, enum.Enum):
    IDLE = "idle"
    CALIBRATING = "calibrating"
    COMPUTING_IMPORTANCE = "computing importance"
    PRUNING = "pruning"
    FINE_TUNING = "fine-tuning"
    EVALUATING = "evaluating"
    EXPORTING = "exporting"
    COMPLETE = "complete"


class Tracker:
    """Holds the current :class:`Stage`, the seconds spent in each stage, and makes progress bars."""

    def __init__(self, show: bool = True):
        self.stage = Stage.IDLE
        self.seconds: dict[str, float] = {}
        self.show = show
        self._since = time.perf_counter()

    def enter(self, stage: Stage) -> None:
        now = time.perf_counter()
        key = self.stage.value
        self.seconds[key] = round(self.seconds.get(key, 0.0) + now - self._since, 3)
        self.stage, self._since = stage, now

    def bar(self, iterable=None, total=None, unit="block", initial=0):
        return tqdm(iterable, total=total, initial=initial, desc=self.stage.value, unit=unit, leave=False,
                    file=sys.stderr, disable=not self.show, dynamic_ncols=True)

    def describe(self, bar, stage: Stage) -> None:
        """Switch stage and show it on an open bar (within one block the stage moves on several times)."""
        if stage is not self.stage:
            self.enter(stage)
        bar.set_description_str(stage.value)
