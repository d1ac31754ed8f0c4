"""Models that stay on disk: a weightless skeleton whose blocks are read one at a time from safetensors.

A pruning walk only ever needs one decoder block in memory.  :func:`open_streamed` builds the model's skeleton
on the ``meta`` device (accelerate's ``init_empty_weights``: parameters take no memory, buffers such as rotary
tables are real) and reads, from the checkpoint's memory-mapped safetensors files, only what the moment needs:
the embeddings while the first block's inputs are captured, one block while it is walked, the final norm and
LM head while logits are computed.  :class:`ShardWriter` writes each finished block to its own shard of the
output folder, so peak memory does not grow with the number of blocks.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..allocator import give_back_freed_memory
from ..errors import ModelLoadError
from ..export import sparse
from .arch import check_finite
from .load import first_line

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class Checkpoint:
    """A safetensors checkpoint folder (one ``model.safetensors`` or shards with an index), read lazily.

    Only the files' headers are read here: each tensor's file, dtype and shape.  A missing or truncated shard,
    or an index naming a file that is not there, is refused in one line naming the file.
    """

    def __init__(self, folder: "str | os.PathLike"):
        self.folder = Path(folder)
        index = self.folder / INDEX
        if not index.exists() and not (self.folder / SINGLE).exists():
            index = self.folder / sparse.INDEX  # a compressed sparse checkpoint (export/sparse.py), if it exists
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as exc:
                raise ModelLoadError(f"{index}: not a safetensors index ({first_line(exc)})") from None
            files = sorted(set(weight_map.values()))
        elif (self.folder / SINGLE).exists():
            files, weight_map = [SINGLE], None
        else:
            raise ModelLoadError(f"{self.folder}: no safetensors weights ({SINGLE} or {INDEX})")
        self.file_of: dict[str, Path] = {}
        self.shape: dict[str, tuple] = {}
        self.dtype: dict[str, torch.dtype] = {}
        self.span: dict[str, tuple[int, int]] = {}  # (first byte in its file, byte count)
        self._maps: dict[Path, mmap.mmap] = {}
        self.files = [self.folder / name for name in files]
        for name in files:
            path = self.folder / name
            if not path.is_file():
                raise ModelLoadError(f"{path}: missing (the checkpoint's index names it)")
            try:
                with safe_open(path, framework="pt") as f:  # checks the header, and that the data fills the file
                    keys = set(f.keys())
                header, start = _header(path)
                for key in keys:
                    if weight_map is not None and weight_map.get(key) != name:
                        continue
                    entry = header[key]
                    self.file_of[key] = path
                    self.shape[key] = tuple(entry["shape"])
                    self.dtype[key] = _DTYPES[entry["dtype"]]
                    begin, end = entry["data_offsets"]
                    self.span[key] = (start + begin, end - begin)
            except SafetensorError as exc:  # safetensors checks that the data covers the file: a truncated one fails
                raise ModelLoadError(f"{path}: not a readable safetensors file, truncated or damaged? "
                                     f"({first_line(exc)})") from None
        if weight_map is not None and (lost := sorted(set(weight_map) - set(self.file_of))):
            raise ModelLoadError(f"{self.folder / weight_map[lost[0]]}: lacks {lost[0]} (and {len(lost) - 1} more) "
                                 "that the index names")
        self.packed: dict[str, dict] = {}  # encoded weight -> its entry; read() decodes it
        self._part_file: dict[str, Path] = {}
        self.stored_bytes: dict[str, int] = {}  # encoded weight -> the bytes of its parts
        if (index.name == sparse.INDEX) != ("secateurs_sparsity" in self._config()):
            raise ModelLoadError(f"{self.folder}: its config and its weight files disagree on whether it is a "
                                 "compressed sparse checkpoint")
        if index.name == sparse.INDEX:
            self._index_encoded(sparse.check_entry(self._config()["secateurs_sparsity"], str(self.folder)))

    def _config(self) -> dict:
        path = self.folder / "config.json"
        try:
            return json.loads(path.read_text()) if path.is_file() else {}
        except ValueError as exc:
            raise ModelLoadError(f"{path}: not JSON ({first_line(exc)})") from None

    def _index_encoded(self, entry: dict) -> None:
        """Name each encoded weight as the weight it stands for (its shape, its values' dtype), its stored
        parts apart: the checkpoint then reads as the dense one it encodes."""
        for name, e in entry["tensors"].items():
            parts = sparse.parts_of(name, e)
            if lost := [p for p in parts if p not in self.file_of]:
                raise ModelLoadError(f"{self.folder}: the compressed checkpoint lacks {lost[0]}")
            for part in parts:
                self._part_file[part] = self.file_of.pop(part)
                del self.shape[part]
                dtype = self.dtype.pop(part)
                self.stored_bytes[name] = self.stored_bytes.get(name, 0) + self.span.pop(part)[1]
                if part.endswith((".values", ".scales")):  # the values' dtype: the weight's
                    self.file_of[name], self.dtype[name] = self._part_file[part], dtype
            self.shape[name] = tuple(e["shape"])
            self.packed[name] = e

    @property
    def stored_dtype(self) -> torch.dtype:
        """The dtype most of the checkpoint's bytes are stored in (its floating-point weights')."""
        sizes: dict[torch.dtype, int] = {}
        for key, dtype in self.dtype.items():
            if dtype.is_floating_point:
                sizes[dtype] = sizes.get(dtype, 0) + int(torch.Size(self.shape[key]).numel())
        return max(sizes, key=sizes.get) if sizes else torch.float32

    def size_in(self, dtype: "torch.dtype | None") -> int:
        """Bytes of every tensor, the floating-point ones in ``dtype`` (None: as stored)."""
        def size(key):
            kind = dtype if dtype is not None and self.dtype[key].is_floating_point else self.dtype[key]
            return int(torch.Size(self.shape[key]).numel()) * torch.empty(0, dtype=kind).element_size()

        return sum(size(k) for k in self.shape)

    def mapped(self, name: str) -> torch.Tensor:
        """Tensor ``name`` as stored, without reading it: a read-only view of the memory-mapped file, whose
        pages come into memory only where it is read (the embedding rows of the tokens in use)."""
        if name in self.packed:  # decoded in memory: an encoded weight has no dense bytes on disk
            return self.read([name])[name]
        path = self.file_of[name]
        if path not in self._maps:
            with open(path, "rb") as f:
                self._maps[path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        first, size = self.span[name]
        dtype = self.dtype[name]
        count = size // torch.empty(0, dtype=dtype).element_size()
        with warnings.catch_warnings():  # read-only memory: torch warns that it cannot be written, which is right
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(self._maps[path], dtype=dtype, count=count, offset=first) if count else \
                torch.empty(0, dtype=dtype)
        return flat.view(self.shape[name])

    def unmap(self) -> None:
        """Close the maps that :meth:`mapped` opened (their pages count as this process's memory while mapped);
        a map still viewed by a live tensor stays open."""
        for path in list(self._maps):
            try:
                self._maps.pop(path).close()
            except BufferError:
                pass

    def chunks(self, name: str, values: int = 2**24):
        """Tensor ``name`` as stored, read from its file ``values`` values at a time (flat tensors): memory for
        one chunk, whatever the tensor's size."""
        if name in self.packed:
            yield from self.read([name])[name].view(-1).split(values)
            return
        first, size = self.span[name]
        width = torch.empty(0, dtype=self.dtype[name]).element_size()
        with open(self.file_of[name], "rb") as f:
            f.seek(first)
            while size:
                data = bytearray(f.read(min(size, values * width)))
                size -= len(data)
                yield torch.frombuffer(data, dtype=self.dtype[name])

    def read(self, names, dtype: "torch.dtype | None" = None) -> dict[str, torch.Tensor]:
        """The tensors ``names``, read from their files (each file opened once), floats cast to ``dtype``."""
        names = list(names)
        stored = [n for n in names if n not in self.packed]
        stored += [p for n in names if n in self.packed for p in sparse.parts_of(n, self.packed[n])]
        by_file: dict[Path, list[str]] = {}
        for name in stored:
            by_file.setdefault(self.file_of.get(name) or self._part_file[name], []).append(name)
        out = {}
        for path, keys in by_file.items():
            try:
                with safe_open(path, framework="pt") as f:
                    for key in keys:
                        out[key] = f.get_tensor(key)
            except SafetensorError as exc:
                raise ModelLoadError(f"{path}: cannot read {keys[0]} ({first_line(exc)})") from None
        packed = [n for n in names if n in self.packed]
        parts = [{p.rsplit(".", 1)[1]: out.pop(p) for p in sparse.parts_of(n, self.packed[n])} for n in packed]
        with ThreadPoolExecutor(max(1, min(len(packed), torch.get_num_threads()))) as pool:  # a weight per core
            out.update(zip(packed, pool.map(lambda n, p: sparse.decode(n, self.packed[n], p), packed, parts)))
        return {k: t.to(dtype) if dtype is not None and t.is_floating_point() else t for k, t in out.items()}


def _header(path: Path) -> tuple[dict, int]:
    """A safetensors file's header and where its data starts: an 8-byte little-endian length, then JSON."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n)), 8 + n


_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
_NAMES = {v: k for k, v in _DTYPES.items()}


def open_streamed(folder: "str | os.PathLike", dtype: "torch.dtype | None" = None):
    """``(model, checkpoint)``: the model of ``folder`` with every parameter on the ``meta`` device.

    ``dtype`` None keeps the checkpoint's own.  The skeleton's parameter shapes are checked against the files
    before anything is read, so a checkpoint that disagrees with its config fails here, naming the file.
    """
    checkpoint = Checkpoint(folder)
    model = skeleton(folder, dtype or checkpoint.stored_dtype)
    if tied_head(model):  # as from_pretrained ties them (a skeleton built on meta is not tied yet)
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    head = _prefix(model, model.get_output_embeddings()) + "weight" if tied_head(model) else None
    tied = tied_elsewhere(model, checkpoint)
    for name, p in model.named_parameters():
        if name == head or name in tied:
            continue  # stored once, as the embeddings (or the tensor it is tied to)
        if name not in checkpoint.shape:
            raise ModelLoadError(f"{folder}: the checkpoint has no {name} (a shard is missing, or another model's)")
        if checkpoint.shape[name] != tuple(p.shape):
            raise ModelLoadError(f"{checkpoint.file_of[name]}: {name} has shape {checkpoint.shape[name]}, the config "
                                 f"says {tuple(p.shape)}")
    return model, checkpoint


def skeleton(folder, dtype: torch.dtype) -> nn.Module:
    """The model of ``folder``'s config with every parameter on the ``meta`` device (buffers are real)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig
    from transformers.initialization import no_init_weights

    from .arch import build_from_config, model_class

    try:
        config = AutoConfig.from_pretrained(folder)
        cls = model_class(config, str(folder))
        if hasattr(config, "secateurs_sparsity"):  # how the files store the weights, not the model: saved dense
            del config.secateurs_sparsity
        with init_empty_weights(include_buffers=False), no_init_weights():  # no values to draw: they are read
            model = build_from_config(cls, config, dtype)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"cannot build the model of {str(folder)!r}: {first_line(exc)}") from exc
    return model.eval()


def foreign_names(folder: "str | os.PathLike", model: "nn.Module | None" = None) -> list[str]:
    """The tensors of ``folder``'s checkpoint that its model (``model``, a skeleton of it if given) does not
    name: a checkpoint in a layout that ``from_pretrained`` converts as it loads (transformers 5 keeps a mixture
    of experts' experts fused, and reads and writes them one tensor per expert, as older versions named them).
    Such a folder is streamed from a converted copy (:mod:`.convert`) or loaded whole."""
    checkpoint = Checkpoint(folder)
    known = set((model or skeleton(folder, checkpoint.stored_dtype)).state_dict())
    return sorted(set(checkpoint.shape) - known)


def tied_elsewhere(model: nn.Module, checkpoint: "Checkpoint") -> dict:
    """``{name: source}``: parameters the model ties to another (transformers' ``all_tied_weights_keys``; a
    masked LM's decoder bias, say) that the checkpoint stores only under the source's name."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    return {t: s for t, s in tied.items() if t not in checkpoint.shape and s in checkpoint.shape}


def retie(model: nn.Module, tied: dict) -> None:
    """Make every pair of tied parameters (``{name: source}``) one tensor again once read: whichever of the two
    was read in (the shared parameter is listed under one name only) replaces the other."""
    for target, source in tied.items():
        read, other = (target, source) if model.get_parameter(source).is_meta else (source, target)
        owner, _, leaf = other.rpartition(".")
        setattr(model.get_submodule(owner), leaf, model.get_parameter(read))


def tied_head(model: nn.Module) -> bool:
    """Does the LM head share the input embeddings' weight (``tie_word_embeddings``)?  Then the checkpoint
    holds it once, under the embeddings' name."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return head is not None and bool(getattr(model.config, "tie_word_embeddings", False))


def load_into(model: nn.Module, module: nn.Module, checkpoint: Checkpoint, dtype: torch.dtype,
              recurse: bool = True, mapped: bool = False) -> None:
    """Read ``module``'s parameters (a submodule of ``model``; only its own with ``recurse=False``) from the
    checkpoint into memory, in ``dtype``.  ``mapped``: parameters stored in ``dtype`` are views of the mapped
    files instead (read-only: for modules that are only run, like the embeddings)."""
    from accelerate.utils import set_module_tensor_to_device

    prefix = _prefix(model, module)
    # a parameter the checkpoint lacks that is already in memory was added by the engine (zero biases for a
    # structured cut's repair): it stays as it is
    names = [n for n, p in module.named_parameters(recurse=recurse) if p.is_meta or prefix + n in checkpoint.shape]
    tied = tied_elsewhere(model, checkpoint)  # stored under the name of the tensor they are tied to
    key = {n: tied.get(prefix + n, prefix + n) for n in names}
    keep = [key[n] for n in names if mapped and checkpoint.dtype[key[n]] == dtype]
    values = {**checkpoint.read([key[n] for n in names if key[n] not in keep], dtype),
              **{k: checkpoint.mapped(k) for k in keep}}
    for n in names:
        set_module_tensor_to_device(module, n, "cpu", value=values[key[n]])


def release(module: nn.Module, recurse: bool = True) -> None:
    """Hand ``module``'s parameters back to the ``meta`` device: their memory is freed."""
    from accelerate.utils import set_module_tensor_to_device

    for n, _ in list(module.named_parameters(recurse=recurse)):
        set_module_tensor_to_device(module, n, "meta")


def _prefix(model: nn.Module, module: nn.Module) -> str:
    name = next((n for n, m in model.named_modules() if m is module), None)
    if name is None:
        raise ValueError("module is not part of the model")
    return f"{name}." if name else ""


def outside_blocks(model: nn.Module, blocks_name: str) -> list[nn.Module]:
    """The modules holding every parameter that is not in a block (embeddings, final norm, LM head)."""
    out = []
    for name, module in model.named_modules():
        if name == blocks_name or name.startswith(blocks_name + ".") or not list(module.parameters(recurse=False)):
            continue
        out.append(module)
    return out


class ShardWriter:
    """Writes a model's tensors into ``folder`` as they are finished: one shard per :meth:`write`, then the
    standard ``model.safetensors.index.json`` that ``from_pretrained`` reads (:meth:`finish`).  ``stem`` names
    the files (``model``: ``model-00001-of-00009.safetensors`` and ``model.safetensors.index.json``)."""

    def __init__(self, folder: Path, shards: int, stem: str = "model"):
        self.folder = Path(folder)
        self.shards = shards
        self.stem = stem
        self.written = 0
        self.weight_map: dict[str, str] = {}
        self.total_size = 0

    def write(self, tensors: dict[str, torch.Tensor]) -> None:
        """``tensors`` as the next shard, each written straight from its memory (no serialised copy)."""
        self.write_entries({k: (v.dtype, tuple(v.shape), lambda out, v=v: out.write(_as_buffer(v)))
                            for k, v in tensors.items()})

    def copy(self, checkpoint: Checkpoint, names: list, dtype: "torch.dtype | None" = None,
             rename=None) -> None:
        """Tensors ``names`` of ``checkpoint``, unchanged, as the next shard (:func:`copied`)."""
        self.write_entries(copied(checkpoint, names, dtype, rename))

    def write_entries(self, entries: dict) -> None:
        """Write the next shard: ``entries`` maps each tensor's name to ``(dtype, shape, write(file))``, the
        last writing exactly the tensor's bytes, called in order; the safetensors header goes first."""
        if self.written == self.shards:
            raise ValueError(f"all {self.shards} shards are written already")
        self.written += 1
        name = self._name(self.written)
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for k, (dtype, shape, _) in entries.items():
            size = int(torch.Size(shape).numel()) * torch.empty(0, dtype=dtype).element_size()
            header[k] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
        try:
            with open(self.folder / name, "wb") as out:
                out.write(len(text).to_bytes(8, "little") + text)
                for _, _, write in entries.values():
                    write(out)
        except OSError as exc:
            from ..errors import OutputError

            raise OutputError(f"cannot write {self.folder / name}: {exc.strerror or exc}") from exc
        self.weight_map.update({k: name for k in entries})
        self.total_size += offset

    def _name(self, k: int) -> str:
        return f"{self.stem}-{k:05d}-of-{self.shards:05d}.safetensors"

    def adopt(self, shards: int) -> None:
        """Count the first ``shards`` shards, which an earlier run wrote into the folder, as written (a resumed
        walk)."""
        from ..errors import ConfigError

        for k in range(self.written + 1, shards + 1):
            path = self.folder / self._name(k)
            try:
                header, _ = _header(path)
            except (OSError, ValueError) as exc:
                raise ConfigError(f"{path}: a finished block's shard of the saved walk is missing or damaged "
                                  f"({first_line(exc)}); remove {self.folder} (with the CLI: --no-resume) to start "
                                  "over") from None
            header.pop("__metadata__", None)
            self.weight_map.update({key: path.name for key in header})
            self.total_size += sum(e["data_offsets"][1] - e["data_offsets"][0] for e in header.values())
        self.written = max(self.written, shards)

    def move_to(self, folder: Path) -> None:
        """Go on writing in ``folder``, moving the shards written so far there (one rename each)."""
        folder = Path(folder)
        for k in range(1, self.written + 1):
            os.replace(self.folder / self._name(k), folder / self._name(k))
        self.folder = folder

    def finish(self) -> None:
        if self.written != self.shards:
            raise ValueError(f"{self.written} of {self.shards} shards written")
        index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.folder / f"{self.stem}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def copied(checkpoint: Checkpoint, names: list, dtype: "torch.dtype | None" = None, rename=None) -> dict:
    """:meth:`ShardWriter.write_entries` entries for tensors ``names`` of ``checkpoint``, unchanged: the bytes
    go from file to file in chunks, never all in memory (floating-point ones stored in another dtype than
    ``dtype``, and encoded weights, are converted or decoded one tensor at a time).  ``rename(name)``, if
    given, is the name each is written under."""
    def converted(k):
        return lambda out: out.write(_as_buffer(checkpoint.read([k], dtype)[k]))

    def raw(k):
        def write(out):
            first, size = checkpoint.span[k]
            with open(checkpoint.file_of[k], "rb") as src:
                src.seek(first)
                while size:
                    chunk = src.read(min(size, 64 * 2**20))
                    out.write(chunk)
                    size -= len(chunk)
        return write

    entries = {}
    for k in names:
        cast = dtype is not None and checkpoint.dtype[k].is_floating_point and checkpoint.dtype[k] != dtype
        entries[rename(k) if rename else k] = (dtype if cast else checkpoint.dtype[k], checkpoint.shape[k],
                                               converted(k) if cast or k in checkpoint.packed else raw(k))
    return entries


class BlockStream:
    """Reads each block from the checkpoint as a walk enters it and frees it when the walk leaves; with a
    ``writer``, the block's finished tensors go to their own output shard first."""

    def __init__(self, model: nn.Module, checkpoint: Checkpoint, dtype: torch.dtype, blocks_name: str,
                 writer: "ShardWriter | None" = None):
        self.model, self.checkpoint, self.dtype = model, checkpoint, dtype
        self.blocks_name = blocks_name
        self.writer = writer
        self.done: set[int] = set()

    def enter(self, i: int, block: nn.Module) -> None:
        load_into(self.model, block, self.checkpoint, self.dtype)
        for name, p in block.named_parameters():  # read only now: a broken checkpoint shows here
            check_finite(f"{self.blocks_name}.{i}.{name.removesuffix('.weight')}", p)

    @contextmanager
    def outside_blocks(self, output: bool = False):
        """While inside, the parameters outside the blocks are in memory: the embeddings and whatever else runs
        before the blocks, and with ``output`` the final norm and LM head too (an untied LM head, as large
        as the embeddings, is read only then)."""
        head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        embeddings = self.model.get_input_embeddings()
        tied = tied_head(self.model)
        wanted = [m for m in outside_blocks(self.model, self.blocks_name) if m is not head or (output and not tied)]
        for m in wanted:
            load_into(self.model, m, self.checkpoint, self.dtype, recurse=False, mapped=True)
        if tied and output:
            head.weight = embeddings.weight
        try:
            yield
        finally:
            for m in wanted + ([head] if tied and output else []):
                release(m, recurse=False)
            if tied:
                head.weight = embeddings.weight  # tied again, as the skeleton was built
            self.checkpoint.unmap()

    def resume(self, first: int) -> None:
        self.done.update(range(first))
        if self.writer is not None:
            self.writer.adopt(first)  # their shards are in the writer's folder already

    @contextmanager
    def read_only(self):
        writer, done = self.writer, set(self.done)
        self.writer = None
        try:
            yield
        finally:
            self.writer, self.done = writer, done

    def leave(self, i: int, block: nn.Module) -> None:
        if self.writer is not None:
            prefix = f"{self.blocks_name}.{i}."
            self.writer.write({prefix + n: t for n, t in block.state_dict().items()})
        release(block)
        give_back_freed_memory()  # flat in the number of blocks (see allocator.py)
        self.done.add(i)

    def copy_renumbered(self, kept: list) -> None:
        """Write blocks ``kept`` (their indices in the checkpoint) unchanged, one shard each, renumbered
        0, 1, ... as a model without the other blocks names them, then everything outside the blocks."""
        names = sorted(self.checkpoint.file_of)
        for new, old in enumerate(kept):
            prefix, renamed = f"{self.blocks_name}.{old}.", f"{self.blocks_name}.{new}."
            self.writer.copy(self.checkpoint, [k for k in names if k.startswith(prefix)], self.dtype,
                             rename=lambda k, p=prefix, r=renamed: r + k[len(p):])
        self._copy_outside_blocks(names)

    def copy_the_rest(self, n_blocks: int) -> None:
        """Write every tensor no walk changed, straight from the checkpoint: the blocks never entered, one shard
        each, then everything outside the blocks (embeddings, final norm, LM head) in the last shard."""
        names = sorted(self.checkpoint.file_of)
        for i in range(n_blocks):
            if i not in self.done:
                prefix = f"{self.blocks_name}.{i}."
                self.writer.copy(self.checkpoint, [k for k in names if k.startswith(prefix)], self.dtype)
        self._copy_outside_blocks(names)

    def _copy_outside_blocks(self, names: list) -> None:
        """Everything outside the blocks (embeddings, final norm, LM head), unchanged, as the last shard."""
        inside = f"{self.blocks_name}."
        self.writer.copy(self.checkpoint, [k for k in names if not k.startswith(inside)], self.dtype)


def _as_buffer(t: torch.Tensor):
    """The bytes of ``t`` (contiguous, on the CPU) as a buffer over its own memory, not a copy."""
    t = t.detach().cpu().contiguous()
    return t.view(-1).view(torch.uint8).numpy() if t.numel() else b""
