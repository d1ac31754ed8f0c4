"""Every error a user can cause derives from :class:`SecateursError`.

The command line prints such an error as one line and exits with status 2; any other exception is a bug in
secateurs (or in a library under it) and keeps its traceback.  Each class also derives from the built-in
exception it used to be (``ValueError``, ``RuntimeError``, ``OSError``), so code that caught those still does.
"""

from __future__ import annotations


class SecateursError(Exception):
    """Base of every error caused by input, data, a model or the machine, rather than by a bug."""


class ConfigError(SecateursError, ValueError):
    """A configuration value (or a combination of them) is invalid; the message names the field."""


class DataError(SecateursError, ValueError):
    """Bad data spec, a row that is not text, or too little text for what was asked."""


class ModelLoadError(SecateursError, RuntimeError):
    """The model could not be loaded, or its weights are unusable; the message says what was tried."""


class ArchitectureError(SecateursError, ValueError):
    """The model has no structure secateurs can prune (no repeated blocks, a head size tied to the width...)."""


class CalibrationError(SecateursError, RuntimeError):
    """The calibration statistics of a layer are unusable (inf or NaN); nothing is pruned from them."""


class VerificationError(SecateursError, RuntimeError):
    """A pruned layer does not obey its target; raised loudly rather than saving a wrong model."""


class OutputError(SecateursError, OSError):
    """The output cannot be written: a folder in the way, too little room, a place that cannot be written."""


class SnapshotError(SecateursError, OSError):
    """Saved state (a weight snapshot, a walk or training checkpoint) cannot be written or read back."""
