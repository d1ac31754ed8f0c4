"""GGUF export: a saved model as one ``.gguf`` file for llama.cpp, Ollama and LM Studio.

Everything GGUF-specific comes from the ``gguf`` package (llama.cpp's own Python library): the writer, the
tensor-name map of each architecture and the quantizers (``Q8_0``, ``Q4_0``: blocks of 32 weights sharing one
fp16 scale).  What this module adds is the reading of a Hugging Face folder -- dense, compressed
(``--save-format sparse``), structurally cut with one width for all blocks, fine-tuned -- one tensor at a time,
the metadata llama.cpp needs, and the two layout changes llama.cpp's own converter makes:

* Llama's query and key rows are reordered per head (llama.cpp applies rotary embeddings to adjacent pairs of
  a head's dimensions, Hugging Face to its two halves): rows ``(heads, 2, d/2)`` become ``(heads, d/2, 2)``;
* norms and biases are stored as float32.

The file is written tensor by tensor (memory: one tensor), into a temporary file renamed into place.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import gguf
import numpy as np
import torch

from ..errors import ConfigError, OutputError

log = logging.getLogger(__name__)
QTYPES = {"f16": gguf.GGMLQuantizationType.F16, "q8_0": gguf.GGMLQuantizationType.Q8_0,
          "q4_0": gguf.GGMLQuantizationType.Q4_0}
QUANTS = tuple(QTYPES)
PLAIN = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16}
ARCHS = {"llama": "LLAMA", "qwen2": "QWEN2"}  # transformers model_type -> gguf.MODEL_ARCH member


def _permute_rope(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Llama's q/k rows from Hugging Face's half-split rotary order to llama.cpp's interleaved one."""
    rows = w.shape[0]
    return w.reshape(heads, 2, rows // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# -------------------------------------------------------------------------------------------------- tokenizer

_PROBE = "Hello world's 12345 don't I'M\n\n  tabs\tand ÄÖü 3.14 «quotes» 你好 x=1+2 ...  \n"


def _pre_tokenizer_name(backend) -> str:
    """llama.cpp's name (``tokenizer.ggml.pre``) for the way ``backend`` (a ``tokenizers.Tokenizer``) splits
    text before its merges, found by splitting a probe text each known way and comparing."""
    from tokenizers import Regex, pre_tokenizers as pt
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    def split(regex):
        return pt.Sequence([pt.Split(Regex(regex), behavior="isolated"),
                            pt.ByteLevel(add_prefix_space=False, use_regex=False)])

    candidates = {"gpt-2": pt.ByteLevel(add_prefix_space=False, use_regex=True),
                  "llama-bpe": split(GGUF_PRE_TOKENIZER_SPLITS["llama-bpe"]),
                  "qwen2": split(GGUF_PRE_TOKENIZER_SPLITS["qwen2"])}
    if backend.pre_tokenizer is None:
        raise ConfigError("GGUF export: the tokenizer has no pre-tokenizer (not a byte-level BPE tokenizer)")
    want = [piece for piece, _ in backend.pre_tokenizer.pre_tokenize_str(_PROBE)]
    for name, candidate in candidates.items():
        if [piece for piece, _ in candidate.pre_tokenize_str(_PROBE)] == want:
            return name
    raise ConfigError("GGUF export: the tokenizer splits text in a way llama.cpp's byte-level BPE tokenizers "
                      f"({', '.join(candidates)}) do not; it cannot be written faithfully")


def _add_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    """A byte-level BPE tokenizer (GPT-2 style: SmolLM, Llama 3, Qwen2) as llama.cpp's ``gpt2`` model."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    if spec.get("model", {}).get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise ConfigError("GGUF export writes byte-level BPE tokenizers (SmolLM, Llama 3, Qwen2); this one is "
                          f"{spec.get('model', {}).get('type', type(tokenizer).__name__)}")
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise ConfigError(f"GGUF export: the tokenizer has ids up to {max(vocab.values())}, the model "
                          f"{vocab_size} embeddings")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for token, i in vocab.items():
        tokens[i], types[i] = token, gguf.TokenType.NORMAL
    for i, added in tokenizer.added_tokens_decoder.items():
        if i < vocab_size:
            types[i] = gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(backend))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for kind, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        if (token_id := getattr(tokenizer, f"{kind}_token_id", None)) is not None:
            add(token_id)
    writer.add_add_bos_token(False)
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


# ---------------------------------------------------------------------------------------------------- export


def check_export(folder: Path) -> dict:
    """The config of the model in ``folder``, refused in one line unless it can be written as GGUF."""
    path = folder / "config.json"
    if not path.is_file():
        raise ConfigError(f"{str(folder)!r} is not a model folder (no config.json)")
    config = json.loads(path.read_text())
    if (config.get("secateurs_structure") or {}).get("shortcuts"):
        raise ConfigError("GGUF export: this model was sliced with per-block rotations, whose residual connections "
                          "go through shortcut matrices that llama.cpp has no place for: slice it with --rotation "
                          "shared to export it")
    if "secateurs_structure" in config:
        raise ConfigError("GGUF export: this model has per-block widths (a structured cut with allocation=global); "
                          "llama.cpp describes one width for every block of a llama model. Cut it with a uniform "
                          "allocation to export it")
    if config.get("model_type") not in ARCHS:
        raise ConfigError(f"GGUF export supports {', '.join(ARCHS)} models; this one is "
                          f"{config.get('model_type')!r}")
    scaling = config.get("rope_scaling") or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ("default", None):
        raise ConfigError(f"GGUF export: rope scaling {rope_type!r} is not written yet")
    return config


def export_gguf(folder: "str | os.PathLike", out: "str | os.PathLike", quant: str = "f16",
                overwrite: bool = False) -> Path:
    """Write the model in ``folder`` as the GGUF file ``out``, its 2-D weights in ``quant`` (``f16``, ``q8_0`` or
    ``q4_0``; a weight whose rows are not a whole number of 32-weight blocks stays f16), norms and biases in
    float32.  ``out`` is written atomically and replaces an existing file only with ``overwrite``."""
    from transformers import AutoConfig

    from ..models.load import check_file_path, load_tokenizer
    from ..atomic import umask
    from ..models.stream import open_streamed

    folder, out = Path(folder), Path(out)
    if quant not in QUANTS:
        raise ConfigError(f"--quant must be one of {', '.join(QUANTS)}, got {quant!r}")
    if out.suffix != ".gguf":
        raise ConfigError(f"the GGUF file's name must end in .gguf: {str(out)!r}")
    check_file_path(out, f"GGUF file {str(out)!r}")
    if out.exists() and not overwrite:
        raise OutputError(f"{str(out)!r} exists (use --overwrite)")
    check_export(folder)
    config = AutoConfig.from_pretrained(folder)
    tokenizer = load_tokenizer(folder)
    _, checkpoint = open_streamed(folder)  # checks every tensor's shape against the config
    arch = getattr(gguf.MODEL_ARCH, ARCHS[config.model_type])
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    qtype = QTYPES[quant]

    def stored(name: str, t: torch.Tensor) -> np.ndarray:
        """Tensor ``name`` as the file stores it: rows reordered for llama.cpp's rotary, then its type."""
        if config.model_type == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            t = _permute_rope(t, heads if "q_proj" in name else kv_heads)
        kind = _type_of(tuple(t.shape), qtype)
        if kind in PLAIN:
            return t.to(torch.float32).numpy().astype(PLAIN[kind])
        return gguf.quants.quantize(t.to(torch.float32).numpy(), kind)

    tensors = []  # (gguf name, checkpoint name): in the checkpoint's order, embeddings first as llama.cpp does
    for name in sorted(checkpoint.shape, key=lambda n: (not n.startswith("model.embed"), n)):
        gname = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise ConfigError(f"GGUF export: llama.cpp's {ARCHS[config.model_type].lower()} has no tensor for "
                              f"{name}")
        tensors.append((gname, name))
    if biased := [n for n in checkpoint.shape if n.endswith(".bias") and config.model_type == "llama"]:
        log.warning("%s holds %d biases of attention or MLP linears (%s, ...; from bias compensation or a refit): "
                    "llama.cpp reads them, but transformers' own GGUF loader drops them for llama models",
                    folder, len(biased), biased[0])
    tmp = Path(tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)[1])
    try:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch])
        writer.add_name(folder.name)
        _add_hyperparameters(writer, config, head_dim)
        writer.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                              "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[quant])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_tokenizer(writer, tokenizer, config.vocab_size)
        for gname, name in tensors:  # the tensor table first: each one's type and size follow from its shape
            shape = checkpoint.shape[name]
            kind = _type_of(shape, qtype)
            nbytes = int(np.prod(shape)) // gguf.GGML_QUANT_SIZES[kind][0] * gguf.GGML_QUANT_SIZES[kind][1]
            if kind in PLAIN:
                writer.add_tensor_info(gname, shape, PLAIN[kind], nbytes)
            else:
                writer.add_tensor_info(gname, gguf.quant_shape_to_byte_shape(shape, kind), np.dtype(np.uint8),
                                       nbytes, raw_dtype=kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for gname, name in tensors:
            writer.write_tensor_data(stored(name, checkpoint.read([name])[name]))
        writer.close()
        tmp.chmod(0o666 & ~umask())  # mkstemp makes it private; the result is an ordinary file
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def _add_hyperparameters(writer, config, head_dim: int) -> None:
    """The shape of the model, under llama.cpp's keys: widths and counts as the (possibly cut) config says them;
    the head size given explicitly, since a head cut leaves it apart from ``hidden_size / heads``."""
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(getattr(config, "rope_theta", None)
                                    or (config.rope_parameters or {}).get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)


def _type_of(shape: tuple, qtype: "gguf.GGMLQuantizationType") -> "gguf.GGMLQuantizationType":
    """The GGML type a tensor of ``shape`` is stored in: vectors (norms, biases) float32; matrices ``qtype``,
    or f16 where a row is not a whole number of the quantizer's blocks (32 weights)."""
    if len(shape) == 1:
        return gguf.GGMLQuantizationType.F32
    if qtype in PLAIN or shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        return gguf.GGMLQuantizationType.F16
    return qtype
