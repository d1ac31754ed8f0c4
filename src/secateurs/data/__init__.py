"""Built-in and local datasets, tokenisation and the calibration / evaluation windows."""

from .text import (BUILTIN_DATA, DEFAULT_DATA, DataError, build_enwiki, calibration_windows, eval_windows,
                   load_text, tokenize)

__all__ = ["BUILTIN_DATA", "DEFAULT_DATA", "DataError", "build_enwiki", "calibration_windows", "eval_windows",
           "load_text", "tokenize"]
