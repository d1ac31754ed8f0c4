"""Validated configuration dataclasses, their YAML/JSON round trip, and recipes.

A **recipe** is a YAML or JSON file whose top-level keys are :class:`PruneConfig` fields (the defaults
for every stage), plus an optional ``stages`` list of overrides applied one after the other::

    method: wanda
    calib_samples: 64
    stages:
      - {include: [attention], sparsity: 0.4}
      - {include: [mlp], sparsity: 0.6}

Without ``stages`` a recipe is one config.  ``eval`` may hold :class:`EvalConfig` fields.
"""

from __future__ import annotations

import json
import re
import types
import typing
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from . import atomic
from .engine.allocation import ALLOCATIONS
from .errors import ConfigError
from .methods import METHODS
from .methods.base import Method, option_table
from .models.load import first_line
from .patterns import Pattern
from .quant import Quant

ROLES = ("all", "attention", "mlp")  # the layers a refinement reads: every one, or one role
SCOPES = (*ROLES, "encoder")  # encoder: every linear of the blocks, everything but a task head
# (the same layers as all; the name of the BERT workflows)
PROPAGATE = ("pruned", "dense")
REFINE = ("none", "admm", "dsnot")  # after the method: admm re-fits the kept weights (methods/reconstruct.py),
# dsnot swaps weights in and out of the mask (methods/dsnot.py)
REFINE_OPTIONS = {"refine_iters": ("admm", "dsnot"), "refine_damp": ("admm",), "refine_threshold": ("dsnot",),
                  "refine_scope": ("dsnot",)}
STRUCTURED = ("channels", "heads", "blocks", "experts", "slicegpt")  # structured methods: remove whole units, not
# single weights
ROTATIONS = ("shared", "per-block")  # slicegpt: one rotation for the whole stream, or one per point (shortcuts)
WIDTH_SCORES = ("magnitude", "wanda", "fluctuation")
DEPTH_SCORES = ("bi", "angular")
EXPERT_SCORES = ("reap", "frequency")
METRICS = ("perplexity", "accuracy", "pseudo-perplexity")  # a causal LM's, a classifier's, a masked LM's


@dataclass(frozen=True)
class LayerRule:
    """One per-layer sparsity override: layers matching ``regex`` (or blocks ``first..last``) get ``sparsity``."""

    sparsity: float
    regex: "str | None" = None
    blocks: "tuple[int, int] | None" = None

    @classmethod
    def parse(cls, text: str) -> "LayerRule":
        """``"REGEX=S"`` or ``"blocks:A-B=S"`` (block indices, inclusive)."""
        key, sep, value = str(text).rpartition("=")
        if not sep or not key:
            raise ConfigError(f"layer_sparsity rule {text!r} must look like 'REGEX=S' or 'blocks:A-B=S'")
        try:
            sparsity = float(value)
        except ValueError:
            raise ConfigError(f"layer_sparsity rule {text!r}: {value!r} is not a number") from None
        if not 0 <= sparsity < 1:
            raise ConfigError(f"layer_sparsity rule {text!r}: sparsity must be in [0, 1)")
        if match := re.fullmatch(r"blocks:(\d+)(?:-(\d+))?", key):
            first = int(match[1])
            last = int(match[2]) if match[2] is not None else first
            if last < first:
                raise ConfigError(f"layer_sparsity rule {text!r}: empty block range")
            return cls(sparsity, blocks=(first, last))
        try:
            re.compile(key)
        except re.error as exc:
            raise ConfigError(f"layer_sparsity rule {text!r}: bad regex ({exc})") from None
        return cls(sparsity, regex=key)

    def matches(self, name: str, block: "int | None") -> bool:
        if self.blocks is not None:
            return block is not None and self.blocks[0] <= block <= self.blocks[1]
        return re.search(self.regex, name) is not None


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def _check_device_name(device: str) -> None:
    try:
        torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device {device!r} is not a torch device (cpu, cuda, cuda:1, mps, ...)") from None


def check_device(device: str) -> None:
    """Refuse a compute device this machine lacks, in one line (torch would fail in the first block move)."""
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as exc:  # a CPU-only build asserts; a build without the driver raises
        why = first_line(exc).split(". ")[0]  # torch's first sentence; the rest lists its backends
        raise ConfigError(f"device {device!r} is not available here: {why}") from None


def check_token_ids(model, ids: torch.Tensor, what: str) -> None:
    """Refuse token ids the model has no embedding for (a tokenizer of another model?), in one line."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(embeddings, "num_embeddings", None)
    if vocab is None or ids.numel() == 0:
        return
    low, high = int(ids.min()), int(ids.max())
    _check(0 <= low and high < vocab, f"{what} holds token id {high if high >= vocab else low}, outside the model's "
           f"vocabulary (0-{vocab - 1}): tokenized for another model?")


def check_seqlen(model, seqlen: int, what: str) -> None:
    """Refuse windows longer than the model's context (``max_position_embeddings``; GPT-2's ``n_positions``).

    Past it, models with learned positions fail with an index error deep in their embeddings, and rotary
    models run on positions they never saw in training: statistics and perplexities that mean nothing.
    """
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    _check(not isinstance(context, int) or seqlen <= context,
           f"{what} {seqlen} is longer than the model's context ({context} positions): use {context} or less")


def _type_name(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin in (list, tuple):
        return f"a list of {_type_name(args[0])}"
    return {type(None): "null", dict: "a mapping", bool: "true/false"}.get(hint, getattr(hint, "__name__", str(hint)))


def _fits(value, hint) -> bool:
    """Does ``value`` (as read from YAML, JSON or the API) have the field type ``hint``?  A bool is no number
    here, a number is no string, and an int is a fine float."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if origin in (list, tuple):
        return isinstance(value, (list, tuple)) and all(_fits(v, args[0]) for v in value)
    if hint is type(None):
        return value is None
    if isinstance(value, bool):
        return hint is bool
    if hint is float:
        return isinstance(value, (int, float))
    return isinstance(value, hint)


def _check_types(config) -> None:
    """Refuse a field of the wrong type in one line naming it (``batch_size: ten``, ``include: 5``)."""
    hints = typing.get_type_hints(type(config))
    for f in fields(config):
        value = getattr(config, f.name)
        _check(_fits(value, hints[f.name]), f"{f.name} must be {_type_name(hints[f.name])}, got {_shown(value)}")
        if isinstance(value, list):  # frozen all the way down
            object.__setattr__(config, f.name, tuple(value))


def check_field_types(cls, data: dict) -> None:
    """Refuse, before ``cls(**data)`` is built, a value of the wrong type for one of the dataclass's fields."""
    hints = typing.get_type_hints(cls)
    for key, value in data.items():
        _check(key not in hints or _fits(value, hints[key]), f"{key} must be {_type_name(hints[key])}, got "
               f"{_shown(value)}")


def _shown(value: Any) -> str:
    """A value's type and (shortened) form, for messages about data of the wrong kind."""
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


class _Serialised:
    """Dict round trip for the config dataclasses: unknown keys are named in the error, not ignored."""

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        _check("refine" not in unknown, f"refine={data.get('refine')} refines the mask and weights a weight method "
               f"({', '.join(sorted(METHODS))}) leaves; {data.get('method', cls.method)} removes whole units instead")
        _check(not unknown, f"unknown config field(s) for method {data.get('method', cls.method)!r}: "
               f"{', '.join(unknown)}")
        return cls(**data)

    def override(self, **changes):
        """A copy with ``changes`` applied, validated again."""
        return type(self).from_dict({**self.to_dict(), **changes})


@dataclass(frozen=True)
class Resolved:
    """A :class:`PruneConfig`'s settings whose defaults depend on the method or the allocation."""

    sparsity: float
    group: str
    propagate: str
    true_sequential: bool
    refine_iters: int
    refine_damp: float
    refine_threshold: float
    refine_scope: str


@dataclass(frozen=True)
class PruneConfig(_Serialised):
    """Everything one pruning run needs; frozen, and validated on construction (see docs/cli.md for each field).

    Fields left ``None`` take a default that depends on the method or the pattern; :attr:`resolved` gives it,
    and the config itself keeps ``None``, so that a copy with another method gets that method's defaults.
    """

    method: str = "wanda"  # a registered method: magnitude | wanda | sparsegpt | ...
    options: dict = field(default_factory=dict)  # the method's own options, e.g. {percdamp: 0.05} for sparsegpt
    sparsity: "float | None" = None  # fraction removed; None = 1 - N/M for N:M, else 0.5
    pattern: str = "unstructured"  # unstructured | N:M (N kept in every M inputs) | block:B
    group: "str | None" = None  # which scores compete: row | layer (sparsegpt: lazy-batch); None = the method's
    allocation: str = "uniform"  # uniform (layer_sparsity rules on top) | global (one ranking of all layers) | owl
    include: "tuple[str, ...]" = ("all",)  # scopes (all/attention/mlp) or regexes
    exclude: "tuple[str, ...]" = ()  # regexes of layer names to leave dense
    layer_sparsity: "tuple[str, ...]" = ()  # ("REGEX=S", "blocks:0-4=0.3"); last match wins
    refine: str = "none"  # none | admm (re-fit the kept weights) | dsnot (swap weights in and out of the mask)
    refine_iters: "int | None" = None  # admm iterations / dsnot's most swaps per row; None = 20 / 50
    refine_damp: "float | None" = None  # admm: each input channel damped by this fraction of its diag(H); None = 0.1
    refine_threshold: "float | None" = None  # dsnot: a row stops once its expected output error, summed over a
    # calibration sequence as in the paper's code, is this small; None = 0.1
    refine_scope: "str | None" = None  # dsnot: the layers it refines, attention | mlp | all; None = attention,
    # as the paper's code
    calib_data: str = "enwiki"
    calib_samples: int = 128  # the papers' setting; the README's quick demo uses fewer
    calib_seqlen: int = 2048
    seed: int = 0
    batch_size: int = 8  # calibration samples per block forward
    propagate: "str | None" = None  # pruned (reference default) | dense; None = pruned (dense for allocation=global)
    true_sequential: "bool | None" = None  # prune q/k/v -> o -> up/gate -> down one after the other; None = method's
    device: str = "cpu"  # where each block is computed; activations stay on the CPU
    quant: str = "none"  # none | int8 | int4: the kept weights become integers with group-wise scales (quant.py)
    group_size: "int | None" = None  # quant: input columns sharing one scale; None = 128
    allow_partial: bool = False  # prune even if much of the scope cannot be pruned (reported, counted in sparsity)
    owl_m: "float | None" = None  # allocation=owl: a weight is an outlier above M x its block's mean score; None = 5
    owl_lambda: "float | None" = None  # allocation=owl: blocks' sparsities span 2 lambda around the mean; None = 0.08

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PruneConfig":
        """Also takes the method's options as top-level keys (``percdamp: 0.05``), as recipes write them."""
        data = dict(data)
        cls_ = METHODS.get(data.get("method", cls.method))
        if cls_ is not None and (flat := [k for k in cls_.options() if k in data]):
            data["options"] = {**(data.get("options") or {}), **{k: data.pop(k) for k in flat}}
        _check(data.get("group") != "global", "group=global is now allocation=global (one ranking across layers)")
        for key in [k for k in data if k in option_table()]:  # an option of another method
            owners = [name for name, c in METHODS.items() if key in c.options()]
            raise ConfigError(f"{key} is an option of {' and '.join(owners)}, not of {data.get('method', cls.method)}")
        return super().from_dict(data)

    def __post_init__(self):
        _check_types(self)
        _check(self.method in METHODS, f"method: unknown {self.method!r}; known: "
               f"{', '.join(sorted(METHODS) + list(STRUCTURED))}")
        cls = METHODS[self.method]
        method = self.build_method()  # checks the options
        try:
            pattern = Pattern.parse(self.pattern)
        except ConfigError as exc:
            raise ConfigError(f"pattern: {exc}") from None
        method.check_pattern(pattern)
        implied = pattern.implied_sparsity
        _check(self.sparsity is None or 0 <= self.sparsity < 1, f"sparsity must be in [0, 1), got {self.sparsity}")
        if implied is not None and self.sparsity is not None:
            _check(abs(self.sparsity - implied) < 1e-9,
                   f"sparsity {self.sparsity} contradicts pattern {pattern} (which keeps {pattern.n} of every "
                   f"{pattern.m}: sparsity {implied:g}); omit --sparsity with N:M patterns")
        _check(self.group != "global", "group=global is now allocation=global (one ranking across layers)")
        _check(self.group is None or self.group in cls.groups,
               f"group {self.group!r} is not offered by {self.method} (choose from {', '.join(cls.groups)})")
        _check(self.allocation in ALLOCATIONS, f"allocation must be one of {', '.join(ALLOCATIONS)}, got "
               f"{self.allocation!r}")
        ranked = self.allocation == "global"
        for rx in [r for r in self.include if r not in SCOPES] + list(self.exclude):
            try:
                re.compile(rx)
            except re.error as exc:
                raise ConfigError(f"include/exclude: bad regex {rx!r} ({exc})") from None
        rules = self.rules  # parses and validates
        owl = self.allocation == "owl"
        for key in ("owl_m", "owl_lambda"):
            _check(getattr(self, key) is None or owl, f"{key} is read only with allocation=owl")
        _check(not (owl and implied is not None), "allocation=owl gives blocks different sparsities, which an N:M "
               "pattern (one sparsity, N/M) cannot have")
        _check(not (owl and rules), "layer_sparsity overrides contradict allocation=owl (it sets every block's)")
        _check(not (owl and cls.needs == "none"), f"allocation=owl measures outliers on calibration activations, "
               f"which {self.method} does not gather: use wanda or sparsegpt")
        _check(self.owl_m is None or self.owl_m > 0, f"owl_m must be > 0, got {self.owl_m}")
        _check(self.owl_lambda is None or 0 < self.owl_lambda < 0.5, f"owl_lambda must be in (0, 0.5), got "
               f"{self.owl_lambda}")
        _check(not (rules and implied is not None), "layer_sparsity overrides cannot be combined with an N:M pattern")
        _check(not (rules and ranked), "layer_sparsity overrides contradict allocation=global (one ranking)")
        _check(self.calib_samples >= 1 and self.calib_seqlen >= 1, "calib_samples and calib_seqlen must be >= 1")
        _check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        _check_device_name(self.device)
        _check(self.propagate is None or self.propagate in PROPAGATE,
               f"propagate must be one of {PROPAGATE}, got {self.propagate!r}")
        _check(not (ranked and self.propagate == "pruned" and cls.needs != "none"),
               "allocation=global ranks every layer before any is pruned, so it needs propagate=dense")
        _check(not (ranked and pattern.kind == "nm"), "an N:M pattern has no global ranking")
        _check(not (ranked and cls.scores is Method.scores), f"{self.method} chooses its masks inside each layer, "
               "with no scores to rank across layers: allocation=global does not apply")
        _check(not (ranked and not method.meets_target), "a threshold decides every layer: allocation=global "
               "does not apply")
        _check(not (self.true_sequential and ranked),
               "allocation=global ranks every layer before any is pruned, so true_sequential does not apply")
        _check(self.refine in REFINE, f"refine must be one of {REFINE}, got {self.refine!r}")
        for key, reader in REFINE_OPTIONS.items():
            _check(getattr(self, key) is None or self.refine in reader,
                   f"{key} is read only with refine={' or '.join(reader)}")
        _check(self.refine_iters is None or self.refine_iters >= 1, f"refine_iters must be >= 1, got {self.refine_iters}")
        _check(self.refine_damp is None or self.refine_damp >= 0, f"refine_damp must be >= 0, got {self.refine_damp}")
        _check(self.refine_threshold is None or self.refine_threshold >= 0,
               f"refine_threshold must be >= 0, got {self.refine_threshold}")
        _check(self.refine_scope is None or self.refine_scope in ROLES,
               f"refine_scope must be one of {ROLES}, got {self.refine_scope!r}")
        _check(not (self.refine == "dsnot" and pattern.kind == "block"), f"refine=dsnot swaps single weights, which "
               f"would break the tiles of pattern {pattern}: use it with unstructured or N:M patterns")
        _check(not (self.refine == "dsnot" and getattr(method, "permute", False)), "refine=dsnot swaps weights "
               "within consecutive groups and would break a permuted N:M mask: drop --permute or the refinement")
        _check(not (self.refine != "none" and ranked),
               "allocation=global masks every layer after the walk, when no layer can be refined any more")
        _check(self.group_size is None or self.quant != "none", "group_size is read only with quant int8 or int4")
        if self.quant_value is not None:  # parses and validates
            _check(not ranked, "allocation=global masks every layer after the walk: quant does not apply")
            _check(method.meets_target, "a threshold decides every layer's mask: quant applies to methods with a "
                   "sparsity target")
            _check(not (getattr(method, "joint_quant", False) and self.refine != "none"),
                   f"{self.method} quantizes inside its sweep (joint_quant), and refine={self.refine} would move "
                   "the weights off the grid afterwards: add --no-joint-quant (round to nearest after the refit)")

    # ------------------------------------------------------------------ derived values
    @property
    def resolved(self) -> Resolved:
        """The settings left ``None`` here, as this method, pattern and allocation resolve them."""
        cls, implied, ranked = METHODS[self.method], self.pattern_value.implied_sparsity, self.allocation == "global"
        sparsity = self.sparsity if self.sparsity is not None else implied if implied is not None else 0.5
        return Resolved(
            sparsity=float(sparsity),
            group=self.group or cls.default_group,
            propagate=self.propagate or ("dense" if ranked else "pruned"),
            true_sequential=self.true_sequential if self.true_sequential is not None else
            cls.true_sequential and not ranked,
            refine_iters=self.refine_iters if self.refine_iters is not None else 50 if self.refine == "dsnot" else 20,
            refine_damp=0.1 if self.refine_damp is None else self.refine_damp,
            refine_threshold=0.1 if self.refine_threshold is None else self.refine_threshold,
            refine_scope=self.refine_scope or "attention")

    @property
    def pattern_value(self) -> Pattern:
        return Pattern.parse(self.pattern)

    @property
    def quant_value(self) -> "Quant | None":
        """The quantization of the kept weights, or None (``quant=none``)."""
        return Quant.parse(self.quant, 128 if self.group_size is None else self.group_size)

    @property
    def rules(self) -> list[LayerRule]:
        return [LayerRule.parse(r) for r in self.layer_sparsity]

    @property
    def needs_calibration(self) -> bool:
        """Said up front: does this config need calibration data?"""
        return METHODS[self.method].needs != "none" or self.refine != "none"

    @property
    def needs(self) -> str:
        """The statistics the engine gathers: the method's own, ``X^T X`` when the weights are re-fitted, at
        least the input norms when DSnoT refines the mask."""
        own = METHODS[self.method].needs
        return "hessian" if self.refine == "admm" else "norms" if self.refine == "dsnot" and own == "none" else own

    @property
    def needs_sums(self) -> bool:
        """Does the engine also gather the input channels' sums (their means: DSnoT)?"""
        return self.refine == "dsnot"

    def build_method(self):
        return METHODS[self.method].build(self.options)

    def selects(self, name: str, role: str) -> bool:
        """Is the linear layer ``name`` (with role attention/mlp) in scope?"""
        included = any(r in ("all", "encoder") or r == role or (r not in SCOPES and re.search(r, name))
                       for r in self.include)
        return included and not any(re.search(r, name) for r in self.exclude)

    def sparsity_for(self, name: str, block: "int | None") -> float:
        value = self.resolved.sparsity
        for rule in self.rules:
            if rule.matches(name, block):
                value = rule.sparsity
        return value

    def check_names(self, linears: "list[tuple[str, int]]", n_blocks: int) -> None:
        """Refuse name rules that match none of the model's block linears ``(name, block)``.

        A typo in ``--include``/``--exclude``/``--layer-sparsity``, or a block range the model does not have,
        would otherwise be ignored in silence and the run would prune with settings nobody asked for.  Rules
        are checked against every linear of the blocks, not only those in this config's scope, so that the
        shared defaults of a staged recipe stay valid for each stage.
        """
        example = linears[0][0] if linears else "(none)"
        for rx in [r for r in self.include if r not in SCOPES] + list(self.exclude):
            _check(any(re.search(rx, name) for name, _ in linears),
                   f"include/exclude: {rx!r} matches no linear layer of the model's blocks (names look like {example})")
        for text, rule in zip(self.layer_sparsity, self.rules):
            if rule.blocks is not None:
                _check(rule.blocks[1] < n_blocks, f"layer_sparsity rule {text!r}: the model has {n_blocks} blocks "
                       f"(0-{n_blocks - 1})")
            else:
                _check(any(rule.matches(name, block) for name, block in linears),
                       f"layer_sparsity rule {text!r} matches no linear layer of the model's blocks "
                       f"(names look like {example})")


@dataclass(frozen=True)
class StructuredConfig(_Serialised):
    """Structured pruning: remove whole MLP channels, attention heads, decoder blocks or experts.

    Give either ``ratio`` (fraction of each layer's channels / heads, or of all of them with
    ``allocation="global"``, or of the blocks) or ``count`` (channels / head units per layer, or blocks).
    """

    method: str = "channels"  # channels | heads | blocks | experts | slicegpt
    ratio: "float | None" = None  # fraction of channels / heads / blocks / experts to remove; slicegpt: of the
    # hidden width (the CLI's --slice)
    count: "int | None" = None  # or: channels (head units, experts) removed per layer, or blocks removed
    score: "str | None" = None  # width: magnitude | wanda | fluctuation (default); blocks: bi (default) | angular;
    # experts: reap (default) | frequency
    allocation: str = "uniform"  # uniform (same width in every block: a plain HF config) | global
    round_to: int = 1  # kept channels per layer are a multiple of this (hardware-friendly widths)
    gqa: str = "per-group"  # heads: per-group (same query heads removed in every KV group) | kv-groups
    rotation: "str | None" = None  # slicegpt: shared (one for the whole stream) | per-block (the paper's)
    refit: bool = False  # least-squares refit of the output projection on calibration activations
    bias_compensation: "bool | None" = None  # FLAP's mean-into-bias repair; None = with fluctuation, where possible
    calib_data: str = "enwiki"
    calib_samples: int = 128
    calib_seqlen: int = 2048
    seed: int = 0
    batch_size: int = 8
    device: str = "cpu"

    def __post_init__(self):
        _check_types(self)
        _check(self.method in STRUCTURED, f"method: {self.method!r} is not structured ({', '.join(STRUCTURED)})")
        depth = self.method == "blocks"
        experts = self.method == "experts"
        if self.method == "slicegpt":
            _check(self.count is None and self.ratio is not None, "slicegpt: give the fraction of the hidden width "
                   "to slice (--slice 0.25)")
            _check(0 < self.ratio < 1, f"slice must be in (0, 1): slicing the whole width leaves no model, got "
                   f"{self.ratio}")
            _check(self.score is None, "slicegpt keeps the stream's principal directions: --score does not apply")
            _check(self.allocation == "uniform", "slicegpt slices one width for the whole stream: allocation uniform")
            _check(not (self.refit or self.bias_compensation), "slicegpt: refit/bias compensation do not apply")
        _check(self.rotation is None or (self.method == "slicegpt" and self.rotation in ROTATIONS),
               f"rotation is read only by slicegpt, one of {', '.join(ROTATIONS)}; got {self.rotation!r}")
        scores = DEPTH_SCORES if depth else EXPERT_SCORES if experts else WIDTH_SCORES
        _check(self.score is None or self.score in scores,
               f"score {self.score!r} is not offered for {self.method} ({', '.join(scores)})")
        _check((self.ratio is None) != (self.count is None),
               f"{self.method}: give exactly one of ratio or count (--ratio, --remove-per-layer, --remove-blocks)")
        _check(self.ratio is None or 0 < self.ratio < 1,
               f"ratio must be in (0, 1): removing everything leaves no model, got {self.ratio}")
        _check(self.count is None or self.count >= 1, f"count must be an integer >= 1, got {self.count}")
        _check(self.allocation in ("uniform", "global"), f"allocation must be uniform or global, got {self.allocation!r}")
        _check(not (self.allocation == "global" and (depth or self.count is not None)),
               "allocation=global spreads a ratio over the layers of channels or heads: give --ratio")
        _check(self.round_to >= 1, f"round_to must be >= 1, got {self.round_to}")
        _check(self.gqa in ("per-group", "kv-groups"), f"gqa must be per-group or kv-groups, got {self.gqa!r}")
        _check(not (self.refit and self.bias_compensation),
               "refit and bias_compensation are two repairs of the same projection: choose one")
        _check(not ((depth or experts) and (self.refit or self.bias_compensation)),
               f"{self.method}: refit/bias compensation do not apply")
        _check(not (experts and self.allocation == "global"),
               "experts: every block loses the same number (one expert count in the config): allocation uniform")
        _check(self.calib_samples >= 1 and self.calib_seqlen >= 1, "calib_samples and calib_seqlen must be >= 1")
        _check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        _check_device_name(self.device)

    @property
    def rotation_name(self) -> str:
        """slicegpt's rotation: the one given, else shared."""
        return self.rotation or "shared"

    @property
    def score_name(self) -> str:
        """The score in use: the one given, else fluctuation for width and Block Influence (bi) for depth."""
        return self.score or {"blocks": "bi", "experts": "reap", "slicegpt": "pca"}.get(self.method, "fluctuation")

    @property
    def needs_calibration(self) -> bool:
        return self.method in ("blocks", "experts", "slicegpt") or self.score_name != "magnitude" or self.refit or \
            bool(self.bias_compensation)


def config_from_dict(data: dict[str, Any]) -> "PruneConfig | StructuredConfig":
    """A :class:`StructuredConfig` for channels / heads / blocks, else a :class:`PruneConfig`."""
    if data.get("method") in STRUCTURED:
        return StructuredConfig.from_dict(data)
    return PruneConfig.from_dict(data)


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation: perplexity on non-overlapping windows by default (stride = seqlen); an encoder's accuracy
    (labelled ``data``) or pseudo-perplexity (``seqlen`` at most its positions)."""

    data: str = "enwiki"
    seqlen: int = 1024
    windows: "int | None" = 16  # None = every full window of the test text
    stride: "int | None" = None
    batch_size: int = 1
    metric: "str | None" = None  # perplexity | accuracy | pseudo-perplexity; None = the model's own: perplexity
    # for a causal LM, accuracy for a sequence classifier (labelled data), pseudo-perplexity for a masked LM

    def __post_init__(self):
        _check_types(self)
        _check(self.metric is None or self.metric in METRICS, f"eval metric must be one of {', '.join(METRICS)}, "
               f"got {self.metric!r}")
        _check(self.seqlen >= 2, f"eval seqlen must be >= 2, got {self.seqlen}")
        _check(self.windows is None or self.windows >= 1, f"eval windows must be >= 1, got {self.windows}")
        _check(self.stride is None or 0 < self.stride <= self.seqlen, "eval stride must be in 1..seqlen")
        _check(self.batch_size >= 1, "eval batch_size must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_mapping(path: "str | Path") -> dict[str, Any]:
    """Read a YAML (``.yaml``/``.yml``) or JSON file holding a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe file {str(path)!r} does not exist")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:
        mark = getattr(exc, "problem_mark", None)  # YAML's messages span lines: keep the problem and where
        why = f"{exc.problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else " ".join(str(exc).split())
        raise ConfigError(f"cannot parse {str(path)!r}: {why}") from None
    _check(isinstance(data, dict), f"{str(path)!r} must hold a mapping of config fields")
    return data


def write_mapping(data: dict[str, Any], path: "str | Path") -> None:
    path = Path(path)
    if path.suffix in (".yaml", ".yml"):
        import yaml

        atomic.write_text(path, yaml.safe_dump(data, sort_keys=False))
    else:
        atomic.write_text(path, json.dumps(data, indent=2) + "\n")


@dataclass
class Recipe:
    """Stages applied in order (each a full :class:`PruneConfig`), plus the evaluation settings."""

    stages: list
    eval: EvalConfig = field(default_factory=EvalConfig)

    @classmethod
    def from_dict(cls, data: dict[str, Any], overrides: "dict[str, Any] | None" = None) -> "Recipe":
        data = dict(data)
        stages = data.pop("stages", None) or [{}]
        _check(isinstance(stages, list), f"stages must be a list of mappings, got {_shown(stages)}")
        for k, stage in enumerate(stages):
            _check(isinstance(stage, dict), f"stages[{k}] must be a mapping of config fields, e.g. "
                                            f"{{sparsity: 0.5}}, got {_shown(stage)}")
        evaluation = data.pop("eval", None) or {}
        _check(isinstance(evaluation, dict), f"eval must be a mapping of evaluation fields, got {_shown(evaluation)}")
        known = [f.name for f in fields(EvalConfig)]
        unknown = sorted(set(evaluation) - set(known))
        _check(not unknown, f"unknown eval field(s): {', '.join(unknown)} (known: {', '.join(known)})")
        base = {**data, **(overrides or {})}
        configs = []
        for k, stage in enumerate(stages):
            try:
                configs.append(config_from_dict({**base, **stage}))
            except ConfigError as exc:  # with several stages, say which one
                raise (ConfigError(f"stages[{k}]: {exc}") if len(stages) > 1 else exc) from None
        return cls(configs, EvalConfig(**evaluation))

    @classmethod
    def load(cls, path: "str | Path", overrides: "dict[str, Any] | None" = None) -> "Recipe":
        return cls.from_dict(read_mapping(path), overrides)

    def to_dict(self) -> dict[str, Any]:
        return {"stages": [s.to_dict() for s in self.stages], "eval": self.eval.to_dict()}

    def save(self, path: "str | Path") -> None:
        write_mapping(self.to_dict(), path)
