"""The training state that ``finetune --save-every N`` keeps beside its output folder, and its resume.

The state holds tensors and plain values only (weights, optimizer and scheduler state, masks, history, the
random generator).  It is read back with ``torch.load(weights_only=True)``, which unpickles nothing else: a
file planted at the state's path cannot run code when a run resumes, it is refused in one line.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from .. import atomic
from ..errors import ConfigError, SnapshotError
from ..models.load import first_line
from ..models.snapshot import weight_bytes
from .finetune import training_state_bytes


def state_file(output: "str | Path") -> Path:
    """Where the training state of a run saving to ``output`` is kept: beside the output folder, not in it."""
    output = Path(output)
    return output.with_name(output.name + ".train-state.pt")


def save_training_state(path: Path, state: dict) -> None:
    """``torch.save``, atomically: a crash while saving keeps the previous state."""
    try:
        atomic.replace_file(path, lambda tmp: torch.save(state, tmp))
    except RuntimeError as exc:  # torch's writer says a full disk as "[enforce fail ...] unexpected pos 576 vs 534"
        free = shutil.disk_usage(path.parent).free / 2**20
        raise SnapshotError(f"cannot save the training state to {str(path)!r} ({first_line(exc)}; {free:,.0f} MiB "
                            "free there); the state saved before it, if any, is kept") from exc


def load_training_state(path: Path, run: dict, config) -> "dict | None":
    """The saved state of an interrupted run with the same ``run`` (model, data, evaluation) and training
    ``config``, or None when there is none; :class:`ConfigError` for a state of another run or a file that is
    not a training state (a truncated one, or a pickle that would run code)."""
    if not path.exists():
        return None
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # truncated, foreign, or holding objects that only a full unpickler would build
        raise ConfigError(f"cannot resume from {path}: not a training state secateurs can read "
                          f"({first_line(exc)}) (remove it or pass --no-resume)") from None
    if not isinstance(state, dict):
        raise ConfigError(f"cannot resume from {path}: not a training state (remove it or pass --no-resume)")
    mine = {**run, "train": config.to_dict()}
    theirs = {**state.get("run", {}), "train": state.get("train")}
    differ = sorted(k for k in mine if mine[k] != theirs.get(k))
    if differ:
        raise ConfigError(f"cannot resume from {path}: it was saved with another {', '.join(differ)} "
                          "(remove it or pass --no-resume)")
    return state


def training_room(model, config, save_every: int, path: Path) -> tuple[int, str]:
    """The disk a run needs beyond the model's own weights, and what to call it all in an error.

    Every checkpoint is written in full beside the one before it, which it then replaces, and the last one is
    deleted only once the model is saved: the peak is two states, or one state and the model.  A state left by
    the run being resumed already takes its room."""
    saves = (config.steps - 1) // save_every if save_every else 0
    if not saves:
        return 0, "the model"
    state, model_size = training_state_bytes(model, config), weight_bytes(model)
    held = path.stat().st_size if path.exists() else 0
    peak = max(held + state, 2 * state if saves > 1 else 0, state + model_size)
    return peak - held - model_size, (f"the model and the training state (--save-every {save_every}: "
                                      f"{saves} checkpoint(s) of ~{state / 2**20:,.0f} MiB)")
