"""secateurs: prune transformers -- weights, N:M groups, blocks -- and measure exactly what it cost."""

__version__ = "0.1.0"

from .allocator import reuse_freed_memory  # noqa: E402
from .api import PruneResult, calibration_data, compare, evaluate, markdown_table, prune, validate  # noqa: E402
from .config import ConfigError, EvalConfig, LayerRule, PruneConfig, Recipe, StructuredConfig  # noqa: E402
from .methods import METHODS, Method, get_method, register  # noqa: E402
from .models import load_model, save_model  # noqa: E402
from .patterns import Pattern  # noqa: E402
from .structured import load  # noqa: E402  -- any saved model, also with per-block widths

__all__ = ["__version__", "PruneResult", "calibration_data", "compare", "evaluate", "markdown_table", "prune", "validate",
           "ConfigError", "EvalConfig", "LayerRule", "PruneConfig", "Recipe", "StructuredConfig", "load", "METHODS", "Method", "get_method",
           "register", "load_model", "save_model", "Pattern", "reuse_freed_memory"]
