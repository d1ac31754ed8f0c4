"""Group-wise symmetric integer quantization of kept weights: the grid, round-to-nearest, dequantization.

A weight ``W`` (out, in) is cut along its input dimension into groups of ``group_size`` columns; each row of
each group has one scale ``s = max |w| / qmax`` (``qmax = 2**(bits-1) - 1``: 127 for int8, 7 for int4), stored in
the model's dtype, and each weight becomes the integer code ``c = round(w / s)`` in ``[-qmax, qmax]``, standing
for ``c * s``.  A pruned weight is code 0, exactly zero.

Every path that makes or reads quantized weights goes through :func:`dequantize`, so the model in memory after
a prune, the model saved and the model loaded hold the same values to the last bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import ConfigError

BITS = {"int8": 8, "int4": 4}


@dataclass(frozen=True)
class Quant:
    """``bits`` per code, the ``group_size`` of input columns that share a scale, and the dtype the scales are
    stored in (the model's: the engine sets it per weight)."""

    bits: int
    group_size: int = 128
    scale_dtype: torch.dtype = torch.float32

    @classmethod
    def parse(cls, name: str, group_size: int = 128) -> "Quant | None":
        if name in (None, "none"):
            return None
        if name not in BITS:
            raise ConfigError(f"quant must be one of none, {', '.join(BITS)}, got {name!r}")
        if group_size < 1:
            raise ConfigError(f"group_size must be >= 1, got {group_size}")
        return cls(BITS[name], group_size)

    @property
    def name(self) -> str:
        return f"int{self.bits}"

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    def groups(self, cols: int) -> int:
        return math.ceil(cols / self.group_size)

    def validate_shape(self, in_features: int, name: str = "weight") -> None:
        if in_features % self.group_size:
            raise ConfigError(f"{name}: group size {self.group_size} does not divide the input width {in_features}")


def group_scales(W: torch.Tensor, quant: Quant) -> torch.Tensor:
    """The scales ``(rows, groups)`` of ``W`` (rows, cols): each group's largest magnitude over ``qmax``, rounded
    to ``quant.scale_dtype`` (as they are stored), as float32."""
    rows, cols = W.shape
    absmax = W.abs().float().reshape(rows, quant.groups(cols), quant.group_size).amax(-1)
    return (absmax / quant.qmax).to(quant.scale_dtype).float()


def expand(scales: torch.Tensor, quant: Quant, cols: int) -> torch.Tensor:
    """Each column's scale: ``(rows, groups)`` -> ``(rows, cols)``."""
    return scales.repeat_interleave(quant.group_size, dim=1)[:, :cols]


def codes_of(W: torch.Tensor, scale: torch.Tensor, quant: Quant) -> torch.Tensor:
    """The integer codes (int8) of ``W`` on the grid of ``scale`` (broadcast to ``W``); a zero scale gives 0."""
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    return torch.round(W.float() / safe).clamp_(-quant.qmax, quant.qmax).where(scale != 0, 0).to(torch.int8)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, quant: Quant, dtype: torch.dtype) -> torch.Tensor:
    """``codes * scale`` in float32, then in ``dtype``: the one way quantized weights become values."""
    return (codes.float() * expand(scales.float(), quant, codes.shape[1])).to(dtype)


def round_to_nearest(W: torch.Tensor, quant: Quant) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W_q, scales)``: ``W`` (rows, cols; pruned weights already zero) quantized to the nearest point of its
    own grid, as float32 values ``dequantize`` gives, and the float32 scales ``(rows, groups)``."""
    scales = group_scales(W, quant)
    return dequantize(codes_of(W, expand(scales, quant, W.shape[1]), quant), scales, quant, torch.float32), scales
