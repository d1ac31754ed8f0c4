"""The compressed sparse checkpoint: a pruned weight stored as what it keeps, plus where it keeps it.

A pruned weight ``W`` of shape ``(rows, cols)`` (any shape: the last dimension is ``cols``, the rest ``rows``)
is stored under its own name plus a suffix, inside ordinary safetensors files (format: ``docs/format.md``):

* ``bitmask`` (unstructured and ``block:B`` results)::

      W.mask    uint8 (rows, ceil(cols / 8))   bit j of byte b in row r (least significant first) = W[r, 8b + j] is kept
      W.values  dtype (kept,)                   the kept values, row by row, left to right

* ``n:m`` (N kept of every M along a row)::

      W.values  dtype (rows, cols / m * n)          the N kept values of each group, left to right
      W.index   uint8 (rows, ceil(cols / m * n * b / 8))  each one's place in its group, in b = ceil(log2 m) bits
      W.order   int32 (cols,)                       only where the pruning reordered the inputs (RIA's permutation):
                                                    the groups are those of W[:, order]

A value is "kept" when any of its bits is set: a stored ``-0.0`` or NaN comes back as it was, so a round trip is
bit-exact.  Each weight is stored in the smallest encoding that holds it exactly (an N:M result whose groups
hold no more than N values may be stored as ``n:m``; a weight with few zeros stays a plain tensor), and the
model's ``config.json`` lists every encoded weight under ``secateurs_sparsity``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import ModelLoadError, VerificationError
from ..patterns import is_permutation
from ..quant import Quant, codes_of, dequantize, expand

FORMAT = "secateurs-sparse"
VERSION = 1
STEM = "model.sparse"  # the weight files: model.sparse-00001-of-0000N.safetensors and model.sparse.safetensors.index.json
INDEX = f"{STEM}.safetensors.index.json"
ROWS = 1024  # rows encoded or decoded at a time: bounds the temporaries (a bool and a uint8 per weight of the rows)

_INT_OF = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def index_bits(m: int) -> int:
    """Bits that number the places ``0 .. m-1`` of a group of ``m``."""
    return max(1, math.ceil(math.log2(m)))


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``codes`` (rows, K) of values below ``2**bits`` as a bit stream per row, least significant bit first:
    uint8 (rows, ceil(K * bits / 8))."""
    rows, k = codes.shape
    stream = codes.to(torch.uint8)
    if bits == 8:
        return stream.contiguous()
    if bits > 1:  # (rows, K, bits): each code's bits, least significant first
        stream = ((stream.unsqueeze(-1) >> torch.arange(bits, dtype=torch.uint8)) & 1).reshape(rows, k * bits)
    return torch.from_numpy(np.packbits(stream.numpy(), axis=1, bitorder="little"))


def unpack_bits(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: uint8 (rows, K)."""
    if bits == 8:
        return packed[:, :k]
    stream = torch.from_numpy(np.unpackbits(packed.numpy(), axis=1, count=k * bits, bitorder="little"))
    if bits == 1:
        return stream
    weights = (1 << torch.arange(bits, dtype=torch.int32)).to(torch.uint8)
    return (stream.view(-1, k, bits) * weights).sum(-1, dtype=torch.int32).to(torch.uint8)


def _kept(w: torch.Tensor) -> torch.Tensor:
    """Where ``w`` (rows, cols) holds a value with any bit set (so ``-0.0`` counts as kept)."""
    return w.view(_INT_OF[w.element_size()]) != 0


def _as_rows(w: torch.Tensor) -> torch.Tensor:
    return w.reshape(-1, w.shape[-1]) if w.dim() != 2 else w


# ----------------------------------------------------------------------------------------- choosing an encoding


def fits_nm(w: torch.Tensor, n: int, m: int) -> bool:
    """Does every group of ``m`` along ``w``'s rows hold at most ``n`` kept values?"""
    w = _as_rows(w)
    if w.shape[-1] % m:
        return False
    return all(int(_kept(w[r:r + ROWS]).view(-1, m).sum(-1).max()) <= n for r in range(0, w.shape[0], ROWS))


def kept_count(w: torch.Tensor) -> int:
    w = _as_rows(w)
    return sum(int(_kept(w[r:r + ROWS]).sum()) for r in range(0, w.shape[0], ROWS))


def _quant(entry: dict, dtype: torch.dtype) -> "Quant | None":
    q = entry.get("quant")
    return Quant(q["bits"], q["group_size"], dtype) if q else None


def encoded_parts(entry: dict, dtype: torch.dtype) -> dict:
    """``{suffix: (dtype, shape)}`` of the tensors that store a weight encoded as ``entry``: ``values`` in
    ``dtype``, or with ``quant`` its integer ``codes`` packed ``bits`` each and the ``scales`` in ``dtype``."""
    shape = entry["shape"]
    rows, cols = math.prod(shape[:-1]), shape[-1]
    quant = _quant(entry, dtype)
    if entry["encoding"] == "bitmask":
        kept = entry["kept"]
        parts = {"mask": (torch.uint8, (rows, -(-cols // 8)))}
        stored = (kept,)
    elif entry["encoding"] == "n:m":
        n, m = entry["n"], entry["m"]
        k = cols // m * n
        parts = {"index": (torch.uint8, (rows, -(-k * index_bits(m) // 8)))}
        stored = (rows, k)
        if entry.get("permuted"):
            parts["order"] = (torch.int32, (cols,))
    else:  # dense: every value, only with quant
        parts, stored = {}, (rows, cols)
    if quant is None:
        return {"values": (dtype, stored), **parts}
    packed = (-(-stored[0] * quant.bits // 8),) if len(stored) == 1 else (rows, -(-stored[1] * quant.bits // 8))
    return {"codes": (torch.uint8, packed), **parts, "scales": (dtype, (rows, quant.groups(cols)))}


def _bytes(parts: dict) -> int:
    return sum(math.prod(shape) * torch.empty(0, dtype=dtype).element_size() for dtype, shape in parts.values())


def choose(w: torch.Tensor, patterns=(), quant: "Quant | None" = None, order=None) -> "dict | None":
    """The entry that stores weight ``w`` exactly: ``n:m`` where ``w`` was pruned with an N:M pattern of
    ``patterns`` (``(n, m)`` pairs) and still fits it (the layout N:M kernels read; at 2:4 as small as the
    bitmask) -- in the input ``order`` (a sequence of ints) where the pruning chose one --, else the bitmask;
    None where that would not be smaller than the plain tensor (few zeros).
    With ``quant`` (the weight holds grid points) the codes are stored, by ``n:m``, or by the smaller of the
    bitmask and ``dense`` (every code, no mask: a weight with few zeros)."""
    shape = list(w.shape)
    extra = {"quant": {"bits": quant.bits, "group_size": quant.group_size}} if quant is not None else {}
    grouped = w if order is None else w[..., torch.as_tensor(order)]
    fit = next(((n, m) for n, m in patterns if fits_nm(grouped, n, m)), None)
    if fit is not None:
        entry = {"encoding": "n:m", "shape": shape, "n": fit[0], "m": fit[1], **extra,
                 **({"permuted": True} if order is not None else {})}
    else:
        entry = {"encoding": "bitmask", "shape": shape, "kept": kept_count(w), **extra}
        dense = {"encoding": "dense", "shape": shape, **extra}
        if quant is not None and _bytes(encoded_parts(dense, w.dtype)) < _bytes(encoded_parts(entry, w.dtype)):
            entry = dense
    if quant is not None:
        return entry
    return entry if _bytes(encoded_parts(entry, w.dtype)) < w.numel() * w.element_size() else None


# ----------------------------------------------------------------------------------------------- encode, decode


def encode(w: torch.Tensor, entry: dict, scales: "torch.Tensor | None" = None, order=None) -> dict[str, torch.Tensor]:
    """``{suffix: tensor}`` storing ``w`` as ``entry`` (from :func:`choose`, with the same ``order``) says; with
    ``quant`` in the entry, ``scales`` (rows, groups) are the grid ``w`` lies on (:mod:`secateurs.quant`),
    checked value by value."""
    w = _as_rows(w.detach().contiguous())
    rows, cols = w.shape
    quant = _quant(entry, w.dtype)
    values = w
    if quant is not None:  # the integer codes stand for the values: they must give them back bit for bit
        values = codes_of(w, expand(scales.float(), quant, cols), quant)
        if not torch.equal(dequantize(values, scales, quant, w.dtype).view(_INT_OF[w.element_size()]),
                           w.view(_INT_OF[w.element_size()])):
            raise VerificationError("a quantized weight does not lie on the grid of its scales")
    permuted = entry.get("permuted")
    if permuted:  # the groups are those of the reordered inputs (the scales stay in the weight's own order)
        order = torch.as_tensor(order, dtype=torch.int64)
        w, values = w[:, order], values[:, order]
    if entry["encoding"] == "bitmask":
        masks, kept = [], []
        for r in range(0, rows, ROWS):
            keep = _kept(w[r:r + ROWS])
            masks.append(pack_bits(keep, 1))
            kept.append(values[r:r + ROWS][keep])
        parts, stored = {"mask": torch.cat(masks)}, torch.cat(kept)
    elif entry["encoding"] == "n:m":
        n, m = entry["n"], entry["m"]
        indices, kept = [], []
        for r in range(0, rows, ROWS):
            groups = w[r:r + ROWS].reshape(-1, cols // m, m)  # (rows', G, m)
            # the n places of each group: its kept values first, then (where it keeps fewer) its first zeros
            rank = (~_kept(groups)).to(torch.int64) * m + torch.arange(m)
            place = rank.argsort(-1)[..., :n].sort(-1).values  # (rows', G, n)
            kept.append(values[r:r + ROWS].reshape(-1, cols // m, m).gather(-1, place).reshape(place.shape[0], -1))
            indices.append(pack_bits(place.reshape(place.shape[0], -1), index_bits(m)))
        parts, stored = {"index": torch.cat(indices)}, torch.cat(kept)
        if permuted:
            parts["order"] = order.to(torch.int32)
    else:
        parts, stored = {}, values
    if quant is None:
        return {"values": stored, **parts}
    offset = (stored.to(torch.int16) + 2 ** (quant.bits - 1)).to(torch.uint8)  # codes as 0 .. 2**bits - 1
    packed = pack_bits(offset.view(1, -1), quant.bits).view(-1) if offset.dim() == 1 else pack_bits(offset, quant.bits)
    return {"codes": packed, **parts, "scales": scales.to(w.dtype)}


def decode(name: str, entry: dict, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """Weight ``name`` from its stored ``parts``, checked against ``entry``: a count or shape that disagrees, or
    an index outside its group, is refused naming the weight."""
    dtype = (parts.get("values") if "values" in parts else parts.get("scales", torch.empty(0))).dtype
    want = encoded_parts(entry, dtype)
    for suffix, (_, shape) in want.items():
        if suffix not in parts:
            raise ModelLoadError(f"{name}: the compressed checkpoint lacks {name}.{suffix}")
        if tuple(parts[suffix].shape) != tuple(shape):
            raise ModelLoadError(f"{name}.{suffix} has shape {tuple(parts[suffix].shape)}, its entry says "
                                 f"{tuple(shape)} (the checkpoint is damaged)")
    shape = entry["shape"]
    rows, cols = math.prod(shape[:-1]), shape[-1]
    quant = _quant(entry, dtype)
    if quant is None:
        values = parts["values"]
    else:  # the codes, as int8: placed like values, then multiplied by their scales
        stored = want["codes"][1]
        count = entry["kept"] if entry["encoding"] == "bitmask" else \
            (cols // entry["m"] * entry["n"] if entry["encoding"] == "n:m" else cols)
        codes = parts["codes"].view(1, -1) if len(stored) == 1 else parts["codes"]
        values = (unpack_bits(codes, quant.bits, count).to(torch.int16) - 2 ** (quant.bits - 1)).to(torch.int8)
        values = values.view(-1) if len(stored) == 1 else values
    out = torch.zeros(rows, cols, dtype=values.dtype)
    if entry["encoding"] == "bitmask":
        used = 0
        for r in range(0, rows, ROWS):
            keep = unpack_bits(parts["mask"][r:r + ROWS], 1, cols).bool()
            count = int(torch.count_nonzero(keep))
            if used + count > values.numel():
                raise _miscounted(name, parts, cols, values.numel())
            out[r:r + ROWS].masked_scatter_(keep, values[used:used + count])
            used += count
        if used != values.numel():
            raise _miscounted(name, parts, cols, values.numel())
    elif entry["encoding"] == "n:m":
        n, m = entry["n"], entry["m"]
        bits = index_bits(m)
        for r in range(0, rows, ROWS):
            place = unpack_bits(parts["index"][r:r + ROWS], bits, cols // m * n).to(torch.int64)
            place = place.view(-1, cols // m, n)
            if place.numel() and (int(place.max()) >= m or (n > 1 and bool((place.diff(dim=-1) <= 0).any()))):
                raise ModelLoadError(f"{name}: an index names no place, or one place twice, in its group of {m} "
                                     "(the checkpoint is damaged)")
            chunk = out[r:r + ROWS].view(-1, cols // m, m)
            chunk.scatter_(-1, place, values[r:r + ROWS].reshape(-1, cols // m, n))
        if entry.get("permuted"):
            order = parts["order"].to(torch.int64)
            if not is_permutation(order, cols):
                raise ModelLoadError(f"{name}.order is not a permutation of its {cols} inputs (the checkpoint is "
                                     "damaged)")
            out[:, order] = out.clone()
    else:
        out = values
    if quant is not None:
        out = dequantize(out, parts["scales"], quant, dtype)
    return out.view(shape)


def _miscounted(name: str, parts: dict, cols: int, stored: int) -> ModelLoadError:
    mask = parts["mask"]
    kept = sum(int(unpack_bits(mask[r:r + ROWS], 1, cols).sum()) for r in range(0, mask.shape[0], ROWS))
    return ModelLoadError(f"{name}: its bitmask keeps {kept} values and {stored} are stored "
                          "(the checkpoint is damaged)")


# ------------------------------------------------------------------------------------------------ the config entry


def check_entry(entry: object, where: str) -> dict:
    """The ``secateurs_sparsity`` entry of a config, refused in one line unless this version can read it."""
    if not isinstance(entry, dict) or entry.get("format") != FORMAT:
        raise ModelLoadError(f"{where}: secateurs_sparsity is not a {FORMAT} entry")
    if entry.get("version") != VERSION:
        raise ModelLoadError(f"{where}: compressed sparse format version {entry.get('version')!r}; this secateurs "
                             f"reads version {VERSION} (a newer secateurs wrote it?)")
    tensors = entry.get("tensors")
    if not isinstance(tensors, dict):
        raise ModelLoadError(f"{where}: secateurs_sparsity lists no tensors")
    for name, e in tensors.items():
        if not isinstance(e, dict) or e.get("encoding") not in ("bitmask", "n:m", "dense") \
                or not isinstance(e.get("shape"), list) or (e["encoding"] == "dense" and not e.get("quant")):
            raise ModelLoadError(f"{where}: {name}: unknown encoding {e.get('encoding') if isinstance(e, dict) else e!r}")
    for name, e in tensors.items():
        q = e.get("quant") if isinstance(e, dict) else None
        if q is not None and (not isinstance(q, dict) or q.get("bits") not in (4, 8)
                              or not isinstance(q.get("group_size"), int) or q["group_size"] < 1):
            raise ModelLoadError(f"{where}: {name}: unknown quantization {q!r}")
    return entry


def parts_of(name: str, entry: dict) -> list[str]:
    """The stored tensor names of encoded weight ``name``."""
    return [f"{name}.{suffix}" for suffix in encoded_parts(entry, torch.float32)]
