"""Find what pruning needs inside any Hugging Face model, from the model itself.

No per-family scripts: the decoder blocks are the largest ``nn.ModuleList`` of identical modules that
hold linear layers; embeddings and head come from ``get_input_embeddings`` / ``get_output_embeddings``.
A "linear" is ``nn.Linear``, GPT-2's ``Conv1D``, whose weight is stored transposed ``(in, out)``, or one
expert's matrix of fused experts while a prune exposes them (:mod:`.experts`);
:func:`weight_of` / :func:`set_weight_of` always speak ``(out, in)``.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ..errors import ArchitectureError, ConfigError, ModelLoadError
from .experts import ExpertLinear
from .pages import overwrite_

try:  # GPT-2 family
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()

# ExpertLinear: one expert's matrix of a mixture of experts' fused experts, while a prune exposes them
LINEAR_TYPES = (nn.Linear, ExpertLinear) + ((Conv1D,) if Conv1D else ())
_ATTENTION = re.compile(r"(^|\.)[^.]*(attn|attention)[^.]*(\.|$)", re.IGNORECASE)


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return ``(qualified name, ModuleList)`` of the model's repeated transformer blocks."""
    best = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        if not any(isinstance(m, LINEAR_TYPES) for m in module[0].modules()):
            continue
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[0]:
            best = (size, name, module)
    if best is None:
        raise ArchitectureError(f"{type(model).__name__} has no repeated blocks (no ModuleList of identical layers "
                                "with linear weights): nothing to prune")
    return best[1], best[2]


def find_linears(module: nn.Module, prefix: str = "") -> dict[str, nn.Module]:
    """All linear layers under ``module``, by qualified name (prefixed), in registration order."""
    return {f"{prefix}{name}": m for name, m in module.named_modules() if isinstance(m, LINEAR_TYPES)}


def role_of(name: str) -> str:
    """``"attention"`` if any path component names attention (``self_attn``, ``attention``, ``attn``), else ``"mlp"``."""
    return "attention" if _ATTENTION.search(name) else "mlp"


ENCODERS = ("bert", "roberta", "distilbert")  # the encoder families secateurs prunes (config.model_type)
ENCODER_HEADS = ("MODEL_MAPPING_NAMES", "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
                 "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES")  # the bare encoder, masked LM, classifier


def _classes(mapping_name: str) -> set:
    from transformers.models.auto import modeling_auto

    mapping = getattr(modeling_auto, mapping_name)
    return {c for v in mapping.values() for c in ([v] if isinstance(v, str) else v)}


def is_encoder_config(config) -> bool:
    """Is ``config`` one of the encoder families (:data:`ENCODERS`) saved as one of their kept classes?"""
    named = list(getattr(config, "architectures", None) or [])
    return getattr(config, "model_type", None) in ENCODERS and bool(named) and \
        named[0] not in _classes("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES")


def model_class(config, where: str):
    """The transformers class ``config``'s checkpoint is built as, so that nothing of it is dropped: its
    family's causal LM, or, for an encoder (:data:`ENCODERS`), the class it was saved as -- the bare encoder,
    the masked LM or the sequence classifier.  Any other class (another task head, ALBERT's shared layers) is
    refused, in one line, before anything is read.  A config that names no class is built as a causal LM."""
    import transformers

    named = list(getattr(config, "architectures", None) or [])
    if not named or named[0] in _classes("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"):
        return transformers.AutoModelForCausalLM
    kind = getattr(config, "model_type", None)
    if kind in ENCODERS:
        if any(named[0] in _classes(m) for m in ENCODER_HEADS):
            return getattr(transformers, named[0])
        raise ModelLoadError(f"{where}: a {named[0]} checkpoint; of {kind} models secateurs keeps the bare encoder, "
                             "the masked LM and the sequence classifier, and loading this one would drop its head")
    if kind == "albert":
        raise ModelLoadError(f"{where}: an ALBERT checkpoint, whose blocks share one set of weights; secateurs "
                             "prunes models whose blocks have their own (BERT, RoBERTa, DistilBERT)")
    raise ModelLoadError(f"{where}: a {named[0]} checkpoint; secateurs prunes causal language models and the "
                         f"encoders {', '.join(ENCODERS)}, and loading this one would drop its {named[0]} head")


def head_of(model: nn.Module) -> str:
    """What a model predicts: ``causal`` (a causal LM), or an encoder's head: ``classifier`` (sequence
    classification), ``masked-lm`` or ``bare`` (the encoder alone)."""
    name = type(model).__name__
    causal = _classes("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES")
    if getattr(model.config, "model_type", None) not in ENCODERS or name in causal:
        return "causal"
    return "classifier" if name.endswith("ForSequenceClassification") else "masked-lm" if name.endswith(
        "ForMaskedLM") else "bare"


def build_from_config(cls, config, dtype=None) -> nn.Module:
    """A fresh model of class ``cls`` (from :func:`model_class`) for ``config``."""
    if cls.__name__.startswith("Auto"):
        return cls.from_config(config, dtype=dtype)
    return cls._from_config(config, dtype=dtype)


def check_streamed_model(model: nn.Module) -> None:
    """The streamed walk and evaluation read a causal LM's blocks from disk; an encoder is pruned in memory."""
    if head_of(model) != "causal":
        raise ConfigError(f"{type(model).__name__} is an encoder: it is loaded whole and pruned in memory, not "
                          "streamed from disk (secateurs.load_model, or the command line, which does so)")


def is_transposed(module: nn.Module) -> bool:
    return bool(Conv1D) and isinstance(module, Conv1D)


def weight_of(module: nn.Module) -> torch.Tensor:
    """The weight as ``(out, in)``. A view of the parameter's data (writes go through)."""
    w = module.weight.data
    return w.t() if is_transposed(module) else w


def set_weight_of(module: nn.Module, W: torch.Tensor) -> None:
    """Write ``W`` ``(out, in)`` back into the module, in its own layout and dtype."""
    target = weight_of(module)
    if W.data_ptr() != target.data_ptr():
        overwrite_(target, W)  # a plain copy_, without the cost of copying the old pages on write


def block_index(name: str, blocks_name: str) -> "int | None":
    """Index of the block a qualified module name lives in, or None."""
    match = re.match(re.escape(blocks_name) + r"\.(\d+)\.", name)
    return int(match[1]) if match else None


def non_finite(W: torch.Tensor) -> int:
    """How many entries of ``W`` are inf or NaN: one ``sum`` (no copy) when there are none, which is almost
    always; an exact count only when that sum is not finite (inf or NaN somewhere, or finite values whose
    sum overflowed).  Weights on the ``meta`` device (offloaded, never loaded) count as finite."""
    if W.device.type == "meta" or bool(torch.isfinite(W.sum())):
        return 0
    return W.numel() - int(torch.count_nonzero(torch.isfinite(W)))


def check_finite(name: str, W: torch.Tensor) -> None:
    """Refuse a weight holding inf or NaN: no ranking of its entries means anything, and the masks the
    kernels would choose among NaN scores are arbitrary."""
    if bad := non_finite(W):
        raise ModelLoadError(f"{name}: {bad} of its {W.numel()} weights are inf or NaN (a broken checkpoint?); "
                             "refusing to prune it")
