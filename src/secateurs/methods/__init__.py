"""Pruning methods, one file each, registered by name (see :mod:`secateurs.methods.base`)."""

from .base import METHODS, InputStats, LayerTarget, Method, Pruned, get_method, register
from . import alps, magnitude, ria, sparsegpt, wanda  # noqa: F401  (import registers them)

__all__ = ["METHODS", "InputStats", "LayerTarget", "Method", "Pruned", "get_method", "register"]
