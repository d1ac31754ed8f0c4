"""Compressed sparse checkpoints as folders: made from a saved dense model, undone into one, measured.

The codec (what a pruned weight becomes) is :mod:`.sparse`; this moves whole checkpoints through it one
file at a time and one weight at a time, so memory holds one weight and its encoding, whatever the model.
Reading is :class:`~secateurs.models.stream.Checkpoint`'s: it presents a compressed folder as the dense
checkpoint it encodes, so every command that reads a model reads it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

from ..errors import ConfigError
from ..models.stream import INDEX, Checkpoint, ShardWriter, _as_buffer, copied
from . import sparse

FORMATS = ("dense", "sparse")


def check_format(save_format: str, configs=()) -> None:
    """:class:`ConfigError` unless models pruned by ``configs`` can be saved in ``save_format``: a structured
    stage with per-block widths (``allocation=global``) is saved dense (its weights are read by its own loader)."""
    from ..config import StructuredConfig

    if save_format not in FORMATS:
        raise ConfigError(f"save format must be one of {', '.join(FORMATS)}, got {save_format!r}")
    if save_format == "dense" and any(getattr(c, "quant", "none") != "none" for c in configs):
        raise ConfigError("quant int8/int4 stores the kept weights as integers: add --save-format sparse")
    if save_format == "sparse" and any(isinstance(c, StructuredConfig) and c.allocation == "global"
                                       for c in configs):
        raise ConfigError("a structured cut with per-block widths (allocation=global) is saved dense: "
                          "drop --save-format sparse or use a uniform allocation")
    if save_format == "sparse" and any(isinstance(c, StructuredConfig) and c.method == "slicegpt"
                                       and c.rotation_name == "per-block" for c in configs):
        raise ConfigError("slicegpt with per-block rotations (shortcut matrices) is saved dense: drop --save-format "
                          "sparse or use --rotation shared")


def compressible(result) -> dict:
    """The weights a prune with result ``result`` (:class:`~secateurs.api.PruneResult`) pruned, each with the
    N:M patterns ``(n, m)`` of its stages (tried before the bitmask) and the quantization of the last stage:
    what :func:`compress_folder` encodes."""
    from ..config import PruneConfig
    from ..patterns import Pattern

    weights = [c for c in result.configs if isinstance(c, PruneConfig)]
    nm = [(p.n, p.m) for c in weights for p in [Pattern.parse(c.pattern)] if p.kind == "nm"]
    quant = weights[-1].quant_value if weights and weights[-1] is result.configs[-1] else None
    return {f"{r.name}.weight": {"patterns": nm, "quant": quant, "order": r.order} for r in result.layers}


def _by_file(checkpoint: Checkpoint) -> dict[Path, list[str]]:
    files: dict[Path, list[str]] = {}
    for name in sorted(checkpoint.file_of):
        files.setdefault(checkpoint.file_of[name], []).append(name)
    return dict(sorted(files.items()))


def compress_folder(folder: "str | os.PathLike", weights: dict) -> None:
    """Store the dense checkpoint in ``folder`` compressed, in place: each of ``weights`` (name -> the N:M
    patterns it was pruned with and its quantization, :func:`compressible`) in its smallest exact encoding
    (:func:`sparse.choose`), every other tensor as it was; ``config.json`` gets the ``secateurs_sparsity``
    entry.  A quantized weight's scales (``NAME.weight_scale``, saved beside it by the prune) are stored with
    its codes.  One input file at a time is rewritten and then removed, so the disk holds one file twice at
    most."""
    folder = Path(folder)
    checkpoint = Checkpoint(folder)
    if checkpoint.packed:
        raise ConfigError(f"{folder} is a compressed sparse checkpoint already")
    # a mixture of experts' experts are pruned fused and written by transformers one tensor per expert, under
    # names of the family's own (Mixtral: experts.0.w1): every tensor of its experts is treated as pruned
    if (experts := next((v for k, v in weights.items() if ".experts." in k), None)) is not None:
        weights = {**{name: experts for name in checkpoint.shape if ".experts." in name}, **weights}
    files = _by_file(checkpoint)
    writer = ShardWriter(folder, len(files), stem=sparse.STEM)
    encoded: dict[str, dict] = {}
    last: dict = {}  # the weight encoded last and its parts: each part is written by its own call

    def part(name, entry, suffix, scales):
        def write(out):
            if last.get("name") != name:
                last.clear()
                last.update(name=name, parts=sparse.encode(checkpoint.mapped(name), entry, scales,
                                                           weights[name].get("order")))
            out.write(_as_buffer(last["parts"][suffix]))
        return write

    def scales_of(name):
        quant = weights[name]["quant"] if name in weights else None
        if quant is None or f"{name}_scale" not in checkpoint.shape:
            return None, None
        return quant, checkpoint.read([f"{name}_scale"])[f"{name}_scale"]

    for path, names in files.items():
        entries = {}
        for name in names:
            if name.endswith("_scale") and name.removesuffix("_scale") in weights:
                continue  # stored with its weight's codes
            quant, scales = scales_of(name)
            entry = sparse.choose(checkpoint.mapped(name), weights[name]["patterns"], quant,
                                  weights[name].get("order")) if name in weights else None
            if entry is None:
                entries.update(copied(checkpoint, [name]))
                continue
            encoded[name] = entry
            for suffix, (dtype, shape) in sparse.encoded_parts(entry, checkpoint.dtype[name]).items():
                entries[f"{name}.{suffix}"] = (dtype, shape, part(name, entry, suffix, scales))
        writer.write_entries(entries)
        last.clear()
        checkpoint.unmap()
        path.unlink()
    (folder / INDEX).unlink(missing_ok=True)
    writer.finish()
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config["secateurs_sparsity"] = {"format": sparse.FORMAT, "version": sparse.VERSION, "tensors": encoded}
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def decompress(source: "str | os.PathLike", output: "str | os.PathLike", overwrite: bool = False) -> Path:
    """Write the plain dense checkpoint that the compressed one in folder ``source`` encodes into folder
    ``output`` (atomically, with ``--overwrite`` rules as for a prune): every weight bit for bit as it was
    before compression, and every other file of ``source`` (tokenizer, report) copied."""
    from ..models.load import check_space, written_folder

    source = Path(source)
    if not (source / "config.json").is_file():
        raise ConfigError(f"{str(source)!r} is not a model folder (no config.json)")
    checkpoint = Checkpoint(source)
    if not checkpoint.packed:
        raise ConfigError(f"{str(source)!r} is not a compressed sparse checkpoint (its config has no "
                          "secateurs_sparsity entry): nothing to decompress")
    check_space(output, None, extra=checkpoint.size_in(None) + 16 * 2**20, what="the dense model")
    files = _by_file(checkpoint)
    with written_folder(output, overwrite) as tmp:
        writer = ShardWriter(tmp, len(files))
        for names in files.values():
            writer.copy(checkpoint, names)
        writer.finish()
        weights = {INDEX, sparse.INDEX, *(p.name for p in checkpoint.files)}
        for path in sorted(source.iterdir()):
            if path.is_file() and path.name not in weights:
                shutil.copyfile(path, tmp / path.name)
        config = json.loads((tmp / "config.json").read_text())
        del config["secateurs_sparsity"]
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return Path(output)


def storage_of(folder: "str | os.PathLike") -> dict:
    """What a saved model takes on disk: ``format``; ``weight_bytes`` (its safetensors files) against
    ``dense_weight_bytes`` (every tensor stored plain in the same dtypes) and their ``ratio``; for a compressed
    checkpoint, ``encoded``: how many weights are encoded, by which encoding, and their bytes against their
    plain bytes."""
    checkpoint = Checkpoint(folder)
    stored = sum(p.stat().st_size for p in checkpoint.files)
    dense = checkpoint.size_in(None)
    out = {"format": "sparse" if checkpoint.packed else "dense", "weight_bytes": stored,
           "dense_weight_bytes": dense, "ratio": round(stored / dense, 4)}
    if checkpoint.packed:
        plain = sum(math.prod(checkpoint.shape[n]) * checkpoint.dtype[n].itemsize for n in checkpoint.packed)
        kept = sum(checkpoint.stored_bytes[n] for n in checkpoint.packed)
        encodings: dict[str, int] = {}
        for e in checkpoint.packed.values():
            encodings[e["encoding"]] = encodings.get(e["encoding"], 0) + 1
        out["encoded"] = {"weights": len(checkpoint.packed), "encodings": encodings, "bytes": kept,
                          "dense_bytes": plain, "ratio": round(kept / plain, 4)}
    return out
