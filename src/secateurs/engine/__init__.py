"""The calibration engine: capture block inputs, walk the blocks, observe, prune, propagate."""

from .capture import BlockCall, StopForward, capture_inputs
from .checkpoint import WalkCheckpoint, WalkState
from .sequential import (CalibrationError, LayerRecord, Observer, Plan, VerificationError, make_plan,
                         prune_with_data, prune_without_data)

__all__ = ["BlockCall", "StopForward", "capture_inputs", "CalibrationError", "LayerRecord", "Observer", "Plan",
           "VerificationError", "WalkCheckpoint", "WalkState", "make_plan", "prune_with_data", "prune_without_data"]
