"""Inference speed and size, measured: prefill throughput, decode latency with a KV cache, bytes on disk.

Timings are medians of several repeats after one warm-up run, on whatever device the model sits on;
:func:`measure_interleaved` alternates between models inside every repeat, for comparisons on a shared machine.
Token ids are random (speed does not depend on the text) but seeded, so runs are alike.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _vocab(model) -> int:
    return model.get_input_embeddings().weight.shape[0]


def _ids(model, n: int) -> torch.Tensor:
    device = next(model.parameters()).device
    return torch.randint(0, _vocab(model), (1, n), generator=torch.Generator().manual_seed(0)).to(device)


@torch.no_grad()
def _prefill_once(model, ids: torch.Tensor) -> float:
    """Tokens/s of one forward over ``ids`` (1, L), no cache."""
    device = ids.device
    _sync(device)
    t = time.perf_counter()
    model(ids, use_cache=False)
    _sync(device)
    return ids.shape[1] / (time.perf_counter() - t)


@torch.no_grad()
def _decode_once(model, prompt: torch.Tensor, new_tokens: int) -> float:
    """Milliseconds per token of ``new_tokens`` greedy one-token steps on the KV cache built from ``prompt``
    (the prefill itself is not timed)."""
    device = prompt.device
    out = model(prompt, use_cache=True)
    cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    _sync(device)
    t = time.perf_counter()
    for _ in range(new_tokens):
        out = model(nxt, past_key_values=cache, use_cache=True)
        cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    _sync(device)
    return (time.perf_counter() - t) * 1000 / new_tokens


def prefill_tokens_per_second(model, seqlen: int = 512, repeats: int = 5) -> dict:
    """Tokens/s of one forward over ``1 x seqlen`` tokens (no cache): median and every repeat."""
    ids = _ids(model, seqlen)
    _prefill_once(model, ids)  # warm-up
    runs = [_prefill_once(model, ids) for _ in range(repeats)]
    return {"median": statistics.median(runs), "runs": runs, "seqlen": seqlen}


def decode_ms_per_token(model, new_tokens: int = 64, prompt: int = 32, repeats: int = 3) -> dict:
    """Milliseconds per generated token over ``new_tokens`` steps with the KV cache: median and every repeat."""
    ids = _ids(model, prompt)
    _decode_once(model, ids, 4)  # warm-up
    runs = [_decode_once(model, ids, new_tokens) for _ in range(repeats)]
    return {"median": statistics.median(runs), "runs": runs, "new_tokens": new_tokens, "prompt": prompt}


def measure_interleaved(models: dict, seqlen: int = 512, new_tokens: int = 64, prompt: int = 32,
                        repeats: int = 7) -> dict:
    """Time several models (e.g. ``{"dense": a, "pruned": b}``) in turn within every repeat, so that a shared
    machine's drift hits them alike; returns :func:`measure`-shaped results per model."""
    ids = {k: _ids(m, seqlen) for k, m in models.items()}
    prompts = {k: _ids(m, prompt) for k, m in models.items()}
    pre = {k: [] for k in models}
    dec = {k: [] for k in models}
    for k, m in models.items():  # warm-up
        _prefill_once(m, ids[k])
        _decode_once(m, prompts[k], 4)
    for _ in range(repeats):
        for k, m in models.items():
            pre[k].append(_prefill_once(m, ids[k]))
            dec[k].append(_decode_once(m, prompts[k], new_tokens))
    return {k: {"params": sum(p.numel() for p in m.parameters()),
                "prefill_tokens_per_s": {"median": statistics.median(pre[k]), "runs": pre[k], "seqlen": seqlen},
                "decode_ms_per_token": {"median": statistics.median(dec[k]), "runs": dec[k],
                                        "new_tokens": new_tokens, "prompt": prompt}}
            for k, m in models.items()}


def folder_bytes(path: "str | Path") -> int:
    """Size of the weight files (``*.safetensors``, ``*.bin``) in a saved model folder."""
    path = Path(path)
    return sum(f.stat().st_size for f in path.iterdir() if f.suffix in (".safetensors", ".bin"))


def saved_bytes(model) -> int:
    """Bytes of the weight files ``save_pretrained`` writes for ``model`` (written to a scratch folder)."""
    with tempfile.TemporaryDirectory(prefix="secateurs-size-") as tmp:
        model.save_pretrained(tmp)
        return folder_bytes(tmp)


def measure(model, seqlen: int = 512, new_tokens: int = 64, repeats: int = 5) -> dict:
    """Parameters, prefill tokens/s and decode ms/token of ``model`` as it is now."""
    params = sum(p.numel() for p in model.parameters())
    return {"params": params, "prefill_tokens_per_s": prefill_tokens_per_second(model, seqlen, repeats),
            "decode_ms_per_token": decode_ms_per_token(model, new_tokens, repeats=max(1, repeats - 2))}


def speed_ratios(dense: dict, pruned: dict) -> dict:
    """Pruned over dense: >1 means faster (prefill) / lower latency (decode, dense ms over pruned ms)."""
    return {"prefill_speedup": pruned["prefill_tokens_per_s"]["median"] / dense["prefill_tokens_per_s"]["median"],
            "decode_speedup": dense["decode_ms_per_token"]["median"] / pruned["decode_ms_per_token"]["median"],
            "params_ratio": pruned["params"] / dense["params"]}


def size_and_speed(model) -> dict:
    """What a structured cut changes, measured on ``model`` as it is now: :func:`measure` and the saved bytes."""
    return {**measure(model), "disk_bytes": saved_bytes(model)}


def size_speed_report(dense: dict, pruned: dict) -> dict:
    """The report's ``size_speed``: both :func:`size_and_speed` measurements and pruned-over-dense ratios."""
    return {"dense": dense, "pruned": pruned, "ratios": {**speed_ratios(dense, pruned),
                                                         "disk_ratio": pruned["disk_bytes"] / dense["disk_bytes"]}}
