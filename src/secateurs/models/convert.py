"""A checkpoint stored in a layout ``from_pretrained`` converts, rewritten once under its model's own names.

transformers 5 keeps a mixture of experts' experts fused (``experts.gate_up_proj`` of shape ``(E, 2I, H)``,
``experts.down_proj`` ``(E, H, I)``) but reads and writes them one tensor per expert, as older versions named
them (``experts.3.gate_proj.weight``; Mixtral: ``block_sparse_moe.experts.3.w1.weight``).  Such a folder cannot
be streamed by name.  :func:`converted_cache` writes it once more, one block at a time, under the names its
model uses, into the cache (as a GGUF file is converted once): the renamings and expert merges are those of
transformers' own conversion mapping, of which two operations are done here -- stacking each expert's matrix
(``MergeModulelist``) and joining gate and up (``Concatenate``).  A mapping that needs anything else is not
converted (the folder is then loaded whole, as before).
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
from pathlib import Path

import torch

from ..errors import OutputError

log = logging.getLogger(__name__)

OPERATIONS = {"MergeModulelist", "Concatenate"}


class Plan:
    """How each of a model's tensors is made from the stored ones: a renamed copy, or the merge of one
    stored tensor per expert for each source pattern (stacked on ``stack``, then joined on ``join``)."""

    def __init__(self):
        self.copy: dict[str, str] = {}  # model name -> stored name
        self.merge: dict[str, tuple] = {}  # model name -> ([{expert: stored name}] per source pattern, stack, join)

    def sources(self, name: str) -> list[str]:
        if name in self.copy:
            return [self.copy[name]]
        parts, _, _ = self.merge[name]
        return [stored for part in parts for _, stored in sorted(part.items())]

    def build(self, name: str, read) -> torch.Tensor:
        """Tensor ``name`` from ``read(stored names) -> {name: tensor}``."""
        if name in self.copy:
            return read([self.copy[name]])[self.copy[name]]
        parts, stack, join = self.merge[name]
        stacked = []
        for part in parts:
            tensors = read([stored for _, stored in sorted(part.items())])
            stacked.append(torch.stack([tensors[stored] for _, stored in sorted(part.items())], dim=stack))
        return stacked[0] if len(stacked) == 1 else torch.cat(stacked, dim=join)


def conversion(stored: list[str], model) -> "Plan | None":
    """The :class:`Plan` that takes the ``stored`` tensor names to ``model``'s (a skeleton), from transformers'
    conversion mapping; None when the mapping needs an operation not done here or does not explain every name
    (the folder is then loaded whole)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
    except ImportError:  # pragma: no cover - a transformers without conversion mappings converts nothing
        return None
    renamings, converters = [], []
    for rule in get_model_conversion_mapping(model):
        operations = getattr(rule, "operations", None) or []
        if not operations:
            renamings += list(zip(rule.source_patterns, rule.target_patterns * len(rule.source_patterns)))
            continue
        kinds = [type(op).__name__ for op in operations]
        if set(kinds) - OPERATIONS or kinds[0] != "MergeModulelist" or len(rule.target_patterns) != 1:
            return None
        join = operations[1].dim if len(operations) > 1 else None
        converters.append(([re.escape(p).replace(r"\*", r"(\d+)") for p in rule.source_patterns],
                           rule.target_patterns[0], operations[0].dim, join))
    plan = Plan()
    for name in stored:
        renamed = name
        for source, target in renamings:
            renamed = re.sub(source, target, renamed)
        for patterns, target, stack, join in converters:
            hit = next(((k, m) for k, p in enumerate(patterns) if (m := re.search(p, renamed))), None)
            if hit is not None:
                k, m = hit
                merged = renamed[:m.start()] + target + renamed[m.end():]
                parts = plan.merge.setdefault(merged, ([{} for _ in patterns], stack, join))[0]
                parts[k][int(m.group(1))] = name
                break
        else:
            plan.copy[renamed] = name
    want = {n: tuple(p.shape) for n, p in model.state_dict().items()}
    made = set(plan.copy) | set(plan.merge)
    if made != set(want) and not (made - set(want) <= _tied(model) and set(want) - made <= _tied(model)):
        return None
    if any(len({len(part) for part in parts}) != 1 for parts, _, _ in plan.merge.values()):
        return None  # an expert missing from one of the matrices
    return plan


def _tied(model) -> set[str]:
    """The LM head's weight when it is the embeddings' (checkpoints store it once)."""
    from .stream import _prefix, tied_head

    return {_prefix(model, model.get_output_embeddings()) + "weight"} if tied_head(model) else set()


def cache_of(folder: Path) -> Path:
    """Where the converted copy of ``folder`` is cached: named after the folder and what tells this version of
    its weights from another (full path, and the size and modification time of every safetensors file)."""
    from .load import cache_dir

    files = sorted(Path(folder).glob("*.safetensors"))
    stamp = "|".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
    key = hashlib.sha256(f"{Path(folder).resolve()}|{stamp}".encode()).hexdigest()[:12]
    return cache_dir() / "converted" / f"{Path(folder).name}-{key}"


def converted_cache(folder: "str | Path") -> "Path | None":
    """The cached copy of ``folder`` under its model's own names, written now if it is not there yet (one
    block in memory at a time); None when its layout is not one :func:`conversion` handles."""
    from .load import check_space, first_line, written_folder
    from .stream import Checkpoint, ShardWriter, skeleton

    folder = Path(folder)
    cached = cache_of(folder)
    if (cached / "config.json").exists():
        return cached
    checkpoint = Checkpoint(folder)
    if checkpoint.packed:
        return None  # a compressed checkpoint in a converted layout is decoded whole (load_compressed)
    model = skeleton(folder, checkpoint.stored_dtype)
    plan = conversion(sorted(checkpoint.shape), model)
    if plan is None:
        return None
    from .arch import find_blocks

    blocks_name, blocks = find_blocks(model)
    names = list(model.state_dict())
    shards = [[n for n in names if n.startswith(f"{blocks_name}.{i}.")] for i in range(len(blocks))]
    shards.append([n for n in names if not n.startswith(blocks_name + ".")])
    log.info("%s stores its experts one tensor per expert: converting it once to its model's layout, a block "
             "at a time (cached in %s)", folder, cached)
    try:
        check_space(cached, None, extra=checkpoint.size_in(None), what="the converted model")
        with written_folder(cached) as tmp:
            writer = ShardWriter(tmp, len(shards))
            for shard in shards:
                writer.write({n: plan.build(n, checkpoint.read).contiguous() for n in shard
                              if n in plan.copy or n in plan.merge})
            writer.finish()
            for extra in folder.iterdir():  # config, tokenizer, generation config: everything but the weights
                if extra.is_file() and not extra.name.endswith((".safetensors", ".safetensors.index.json")):
                    shutil.copy2(extra, tmp / extra.name)
    except (OSError, OutputError) as exc:
        if (cached / "config.json").exists():  # another run converted the same folder first: use its copy
            return cached
        log.warning("cannot cache the converted %s in %s (%s): it is loaded whole instead; SECATEURS_CACHE can "
                    "name a folder with room", folder, cached, first_line(exc))
        return None
    return cached
