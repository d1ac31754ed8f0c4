"""Structured pruning: remove MLP channels, attention heads, whole blocks or experts, or slice the hidden width
(SliceGPT); keep the model loadable."""

from .engine import StructuredRecord, check_structured, prune_depth, prune_width
from .surgery import STRUCTURE_KEY, check_loadable, load, structure_of


def prune_structured(model, config, input_ids, tracker, source=None):
    """Run one :class:`~secateurs.config.StructuredConfig` stage; returns ``(records, block scores or None)``.
    ``source``: where a streamed model's blocks come from and go to (see :func:`prune_width`)."""
    from ..engine.walk import IN_MEMORY

    if config.method == "blocks":
        return prune_depth(model, config, input_ids, tracker, source or IN_MEMORY)
    if config.method == "slicegpt":
        from .slicing import prune_slicegpt

        return prune_slicegpt(model, config, input_ids, tracker, source or IN_MEMORY)
    if config.method == "experts":
        from .experts import prune_experts

        return prune_experts(model, config, input_ids, tracker, source or IN_MEMORY)
    return prune_width(model, config, input_ids, tracker, source or IN_MEMORY)


__all__ = ["StructuredRecord", "check_structured", "prune_depth", "prune_width", "prune_structured", "STRUCTURE_KEY",
           "check_loadable", "load", "structure_of"]
