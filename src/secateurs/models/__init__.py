"""Model loading (hub ids, folders, GGUF files, built-ins) and architecture discovery."""

from .arch import ArchitectureError, find_blocks, find_linears, role_of, weight_of, set_weight_of
from .load import BUILTIN_MODELS, DEFAULT_MODEL, ModelLoadError, check_output, check_space, load_model, save_model

__all__ = ["ArchitectureError", "find_blocks", "find_linears", "role_of", "weight_of", "set_weight_of",
           "BUILTIN_MODELS", "DEFAULT_MODEL", "ModelLoadError", "check_output", "check_space", "load_model",
           "save_model"]
