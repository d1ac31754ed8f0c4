"""Pruning during training: schedules, masks that stay put, gradual pruning, iterative prune-retrain, recovery."""

from .callbacks import MaskCallback
from .finetune import TrainConfig, TrainHistory, train, training_batch, training_state_bytes
from .iterate import cycle_sparsities, cycle_targets, iterate, last_complete_cycle
from .lora import LoRALinear, add_lora, merge_lora
from .masks import GradualPruner, Masks, measured_sparsity, prunable_linears
from .schedules import SCHEDULES, Schedule, increment, register_schedule


__all__ = ["TrainConfig", "TrainHistory", "train", "training_batch", "training_state_bytes", "cycle_sparsities", "cycle_targets", "iterate",
           "last_complete_cycle", "LoRALinear", "add_lora", "merge_lora", "GradualPruner", "Masks",
           "measured_sparsity", "prunable_linears", "SCHEDULES", "Schedule", "increment", "register_schedule",
           "MaskCallback"]
