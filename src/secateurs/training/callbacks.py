"""The Hugging Face ``Trainer`` side: a callback that holds (or grows) the masks through training."""

from __future__ import annotations

from transformers import TrainerCallback

from .masks import GradualPruner, Masks


class MaskCallback(TrainerCallback):
    """Re-apply the masks right after every optimizer step (and at every step's end, which is idempotent).

    ``MaskCallback(Masks.from_zeros(model))`` keeps a one-shot mask frozen; ``MaskCallback(pruner=GradualPruner(
    model, schedule))`` grows the mask on the schedule at the start of each step.
    """

    def __init__(self, masks: "Masks | None" = None, pruner: "GradualPruner | None" = None):
        if (masks is None) == (pruner is None):
            raise ValueError("give masks (frozen) or pruner (scheduled), not both")
        self.pruner = pruner
        self.masks = pruner.masks if pruner else masks

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if self.pruner is not None:
            self.pruner.step(state.global_step)

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.masks.apply(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.masks.apply(model)
