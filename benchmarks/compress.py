"""Smaller outputs on the built-in model: compressed sparse checkpoints, quantized kept weights, GGUF files.

    python benchmarks/compress.py                  # every run below, ~30 min on 2 CPU cores
    python benchmarks/compress.py --runs wanda:2:4,quant:sparsegpt:0.5+int4-joint

Three kinds of run, each in a fresh process (SmolLM2-135M, the built-in model; calibration = the quick
protocol's 32 x 512 tokens of enwiki train, seed 0; 2 threads):

* ``METHOD:SETTING`` -- bytes and load time, bfloat16: the pruned model saved dense (``save_pretrained``) and
  with ``--save-format sparse``; bytes of every safetensors file and of the pruned linears alone
  (:func:`secateurs.export.compressed.storage_of`); ``secateurs.load_model`` of each, alternated, median of 5,
  alone and followed by one forward of 8 tokens (which reads every weight: a dense load maps its files and
  reads them only then); both loaded models checked equal bit for bit, with the same perplexity on 4 x 1024
  tokens of enwiki test.
* ``quant:ROW`` -- quality of quantized kept weights, bfloat16, group size 96 (128 does not divide the model's
  576-wide inputs): the model is pruned (SparseGPT, or nothing), saved compressed, loaded back, and its
  perplexity measured on the quick protocol's 16 x 1024 tokens of enwiki test.  ``+int4-rtn`` rounds to
  nearest after pruning; ``+int4-joint`` quantizes inside SparseGPT's sweep.
* ``gguf:METHOD[:SETTING]`` -- the pruned model (float32, as the quick protocol) exported with
  ``secateurs export --gguf`` as f16, q8_0 (and q4_0 for Wanda), read back by transformers' own GGUF loader,
  perplexity on the protocol's windows against the source's; with llama-cpp-python installed, llama.cpp's
  prefill (256 tokens) and decode (64 tokens) speed on 2 threads.

Results go to ``benchmarks/results/compress.{json,md}``.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import PROTOCOL_WINDOWS, SEQLEN, benchmark_main, measured_on, protocol_config

RUNS = ["wanda:0.5", "wanda:2:4", "wanda:0.7", "wanda:4:8", "sparsegpt:0.5",
        "quant:dense", "quant:dense+int4", "quant:sparsegpt:0.5", "quant:sparsegpt:0.5+int4-rtn",
        "quant:sparsegpt:0.5+int4-joint", "quant:sparsegpt:2:4", "quant:sparsegpt:2:4+int4-rtn",
        "quant:sparsegpt:2:4+int4-joint",
        "gguf:dense", "gguf:wanda:0.5", "gguf:channels:0.25"]
TARGET = {"0.5": 0.57, "2:4": 0.57, "0.7": 0.37}  # issue 23: pruned linears' bytes / dense, bf16
LOADS = 5
GROUP = 96


def _setup(dtype):
    import torch

    from secateurs import load_model

    torch.set_num_threads(2)
    torch.manual_seed(0)
    return load_model("smollm2-135m", dtype)


def _eval(model, tok, windows=PROTOCOL_WINDOWS):
    from secateurs import EvalConfig, evaluate
    from secateurs.data import load_text, tokenize

    return evaluate(model, tok, EvalConfig(seqlen=SEQLEN, windows=windows), ids=tokenize(tok, load_text("enwiki", "test")),
                    progress=False)


def size_run(run: str) -> dict:
    import torch

    from secateurs import calibration_data, load_model, prune, save_model
    from secateurs.export.compressed import compressible, decompress, storage_of

    method, setting = run.split(":", 1)
    model, tok = _setup(torch.bfloat16)
    cfg = protocol_config(method, setting)
    result = prune(model, cfg, calibration_data(tok, cfg), progress=False)
    probe = torch.tensor([tok("The history of the city begins")["input_ids"][:8]])
    with tempfile.TemporaryDirectory() as tmp:
        dense, packed = Path(tmp) / "dense", Path(tmp) / "sparse"
        save_model(model, tok, dense)
        t = time.perf_counter()
        save_model(model, tok, packed, compress=compressible(result))
        save_seconds = time.perf_counter() - t
        del model
        times = {k: [] for k in ("dense", "sparse", "dense+forward", "sparse+forward")}
        for _ in range(LOADS):
            for name, folder in (("dense", dense), ("sparse", packed)):
                for forward in (False, True):
                    t = time.perf_counter()
                    loaded, _ = load_model(str(folder))
                    if forward:
                        with torch.no_grad():
                            loaded(probe)
                    times[name + ("+forward" if forward else "")].append(time.perf_counter() - t)
                    del loaded
        a, b = load_model(str(dense))[0], load_model(str(packed))[0]
        sa, sb = a.state_dict(), b.state_dict()
        if sa.keys() != sb.keys() or not all(torch.equal(sa[k].view(torch.uint8), sb[k].view(torch.uint8))
                                             for k in sa if sa[k].is_floating_point()):
            raise SystemExit("the compressed checkpoint does not load as the dense one")
        ppl = [_eval(m, tok, windows=4) for m in (a, b)]
        if ppl[0] != ppl[1]:
            raise SystemExit(f"perplexity differs: {ppl}")
        t = time.perf_counter()
        decompress(packed, Path(tmp) / "back")
        decompress_seconds = time.perf_counter() - t
        return {"kind": "size", "method": method, "setting": setting, "sparsity": result.sparsity,
                "dense_storage": storage_of(dense), "sparse_storage": storage_of(packed),
                "load_seconds": {k: [round(x, 3) for x in v] for k, v in times.items()},
                "load_median": {k: round(statistics.median(v), 3) for k, v in times.items()},
                "save_sparse_seconds": round(save_seconds, 2), "decompress_seconds": round(decompress_seconds, 2),
                "perplexity_4x1024": ppl[1]}


def quant_run(row: str) -> dict:
    import torch

    from secateurs import PruneConfig, calibration_data, load_model, prune, save_model
    from secateurs.export.compressed import compressible, storage_of

    model, tok = _setup(torch.bfloat16)
    base, _, quant = row.partition("+")
    out = {"kind": "quant", "row": row, "group_size": GROUP}
    if base == "dense" and not quant:
        size = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".layers." in n and
                   n.endswith("proj.weight"))
        return {**out, "perplexity": _eval(model, tok), "linears_ratio": 1.0, "linears_bytes": size,
                "prune_seconds": 0.0}
    if base == "dense":  # every linear of the blocks rounded to int4, nothing removed
        cfg = PruneConfig(method="magnitude", sparsity=0.0, quant="int4", group_size=GROUP)
        calib = None
    else:
        method, setting = base.split(":", 1)
        options = {}
        if quant:
            options = dict(quant="int4", group_size=GROUP, options={"joint_quant": quant == "int4-joint"})
        cfg = protocol_config(method, setting, **options)
        calib = calibration_data(tok, cfg)
    result = prune(model, cfg, calib, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        save_model(model, tok, Path(tmp) / "m", compress=compressible(result))
        storage = storage_of(Path(tmp) / "m")
        del model
        loaded, _ = load_model(str(Path(tmp) / "m"))
        return {**out, "perplexity": _eval(loaded, tok), "sparsity": result.sparsity,
                "prune_seconds": round(result.prune_seconds, 2), "storage": storage,
                "linears_ratio": storage["encoded"]["ratio"], "linears_bytes": storage["encoded"]["bytes"]}


_LLAMA_CPP = """
import json, math, statistics, sys, time
import numpy as np
import llama_cpp.llama_cpp as low_level
from llama_cpp import Llama
# weight repacking (AMX and other extra buffer types) crashes this build on this CPU for every quantized file,
# llama.cpp's own Q4_1 of the built-in model too: run without it
default_params = low_level.llama_model_default_params
def model_params():
    params = default_params()
    params.use_extra_bufts = False
    return params
low_level.llama_model_default_params = model_params
path, job = sys.argv[1], json.load(open(sys.argv[2]))
ids, windows = job["ids"], job["windows"]
llm = Llama(model_path=path, n_ctx=512, n_threads=2, n_batch=256, verbose=False)
prefill, decode = [], []
for _ in range(3):
    llm.reset()
    t = time.perf_counter()
    llm.eval(ids[:256])
    prefill.append(256 / (time.perf_counter() - t))
    t = time.perf_counter()
    for token in ids[256:320]:
        llm.eval([token])
    decode.append((time.perf_counter() - t) / 64 * 1000)
llm.close()
# perplexity on the evaluation's own windows, scored as secateurs scores them (targets after n_context)
llm = Llama(model_path=path, n_ctx=len(windows[0][0]), n_threads=2, n_batch=512, logits_all=True, verbose=False)
nll, count = 0.0, 0
for window, n_context in windows:
    llm.reset()
    llm.eval(window)
    logits = np.asarray(llm.scores[: len(window)], dtype=np.float64)[max(n_context - 1, 0) : -1]
    logits -= logits.max(-1, keepdims=True)
    logprobs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    targets = window[max(n_context, 1):]
    nll -= float(logprobs[np.arange(len(targets)), targets].sum())
    count += len(targets)
llm.close()
print(json.dumps({"prefill_tokens_per_s": round(statistics.median(prefill), 1),
                  "decode_ms_per_token": round(statistics.median(decode), 2), "perplexity": math.exp(nll / count)}))
"""


def _llama_cpp(path: Path, ids: list, windows: list) -> "dict | None":
    """llama.cpp's prefill tokens/s (256 tokens), decode ms/token (64 tokens, one at a time), 2 threads, median
    of 3, and perplexity on ``windows`` (``(token ids, n_context)``), in a process of its own (llama.cpp and torch
    in one process crash here); None where llama-cpp-python is not installed."""
    import importlib.util
    import json
    import subprocess

    if importlib.util.find_spec("llama_cpp") is None:
        return None
    job = path.with_suffix(".json")
    job.write_text(json.dumps({"ids": ids, "windows": windows}))
    proc = subprocess.run([sys.executable, "-c", _LLAMA_CPP, str(path), str(job)], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"llama.cpp could not run {path.name}: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def gguf_run(spec: str) -> dict:
    import torch
    import transformers

    from secateurs import EvalConfig, StructuredConfig, calibration_data, load_model, prune, save_model
    from secateurs.data import load_text, tokenize
    from secateurs.eval.perplexity import window_groups
    from secateurs.export.gguf import export_gguf

    model, tok = _setup(torch.float32)
    method, _, setting = spec.partition(":")
    if method == "channels":
        cfg = StructuredConfig(method="channels", ratio=float(setting), calib_samples=32, calib_seqlen=512)
        prune(model, cfg, calibration_data(tok, cfg), progress=False)
    elif method != "dense":
        cfg = protocol_config(method, setting)
        prune(model, cfg, calibration_data(tok, cfg), progress=False)
    quants = ["f16", "q8_0", "q4_0"] if method == "wanda" else ["f16", "q8_0"]
    text = load_text("enwiki", "test")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        save_model(model, tok, folder)
        del model
        source, tok = load_model(str(folder))
        out = {"kind": "gguf", "source": spec, "source_perplexity": _eval(source, tok), "files": {}}
        ids = tokenize(tok, text)
        windows = [(w.tolist(), ctx) for batch, ctx in
                   window_groups(source, tok, EvalConfig(seqlen=SEQLEN, windows=PROTOCOL_WINDOWS), ids)
                   for w in batch]  # exactly the windows _eval scored
        ids = ids[:320].tolist()
        del source
        for quant in quants:
            path = Path(tmp) / f"m-{quant}.gguf"
            t = time.perf_counter()
            export_gguf(folder, path, quant)
            seconds = time.perf_counter() - t
            g_model = transformers.AutoModelForCausalLM.from_pretrained(tmp, gguf_file=path.name, dtype=torch.float32)
            g_tok = transformers.AutoTokenizer.from_pretrained(tmp, gguf_file=path.name)
            same_ids = g_tok(text[:20000])["input_ids"] == tok(text[:20000])["input_ids"]
            ppl = _eval(g_model.eval(), g_tok)
            del g_model
            out["files"][quant] = {"bytes": path.stat().st_size, "export_seconds": round(seconds, 2),
                                   "perplexity": ppl, "same_token_ids": same_ids,
                                   "relative": ppl / out["source_perplexity"] - 1,
                                   "llama_cpp": _llama_cpp(path, ids, windows)}
        return out


def one(run: str) -> dict:
    from secateurs.api import environment

    kind, _, rest = run.partition(":")
    row = quant_run(rest) if kind == "quant" else gguf_run(rest) if kind == "gguf" else size_run(run)
    return {"run": run, **row, **environment()}


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def markdown(rows: list[dict], command: str) -> str:
    lines = ["# Smaller outputs: compressed sparse checkpoints, quantization, GGUF (SmolLM2-135M)", "",
             measured_on(rows[0]), "", f"Reproduce: `{command}` (what each kind of run does: the script's docstring).",
             ""]
    size = [r for r in rows if r["kind"] == "size"]
    if size:
        lines += ["## Compressed sparse checkpoints (bfloat16)", "",
                  "`linears` = the pruned weight matrices' bytes against their dense bytes (the target is issue "
                  "23's); `checkpoint` = every safetensors byte of the folder (the embeddings, 28 % of the model, "
                  f"stay dense). Load = `secateurs.load_model(folder)` from the page cache, median of {LOADS} "
                  "alternated loads; `+ forward` adds one forward of 8 tokens, which reads every weight (a dense "
                  "load maps its files and reads them only then). Both folders load to the same weights bit for "
                  "bit and the same perplexity (4 x 1024 tokens: the column), checked in the run.", "",
                  "| method | setting | sparsity | encoding | linears dense / sparse MiB | ratio | target | "
                  "checkpoint dense / sparse MiB | ratio | load dense / sparse s | ratio | load + forward dense / "
                  "sparse s | ratio | ppl |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in size:
            e, d, s, t = r["sparse_storage"]["encoded"], r["dense_storage"], r["sparse_storage"], r["load_median"]
            target = TARGET.get(r["setting"])
            lines.append(
                f"| {r['method']} | {r['setting']} | {r['sparsity']:.3f} | {', '.join(e['encodings'])} | "
                f"{_mib(e['dense_bytes'])} / {_mib(e['bytes'])} | {e['ratio']:.4f} | "
                f"{'≤ %.2f' % target if target else '—'} | {_mib(d['weight_bytes'])} / {_mib(s['weight_bytes'])} | "
                f"{s['weight_bytes'] / d['weight_bytes']:.3f} | {t['dense']:.2f} / {t['sparse']:.2f} | "
                f"{t['sparse'] / t['dense']:.2f} | {t['dense+forward']:.2f} / {t['sparse+forward']:.2f} | "
                f"{t['sparse+forward'] / t['dense+forward']:.2f} | {r['perplexity_4x1024']:.2f} |")
        lines += ["", "Saving compressed (the dense files written, then re-stored) / `secateurs decompress`: " +
                  "; ".join(f"{r['run']} {r['save_sparse_seconds']} s / {r['decompress_seconds']} s" for r in size),
                  ""]
    quant = [r for r in rows if r["kind"] == "quant"]
    if quant:
        lines += ["## Quantized kept weights (bfloat16, int4, group size 96)", "",
                  "Perplexity of the model loaded back from its compressed folder, on the quick protocol's 16 x "
                  "1024 tokens of enwiki test. `linears` = the bytes of the blocks' linear weights against bf16 "
                  "dense (issue 23's target for SparseGPT 50% + int4 joint: ≤ 0.2, and better than RTN). Group "
                  "size 96: 128 does not divide the model's 576-wide inputs (a group size that does not divide "
                  "is refused).", "",
                  "| row | perplexity | linears MiB | linears / bf16 dense | prune s |", "|---|---|---|---|---|"]
        for r in quant:
            lines.append(f"| {r['row']} | {r['perplexity']:.2f} | {_mib(r['linears_bytes'])} | "
                         f"{r['linears_ratio']:.4f} | {r['prune_seconds']:.1f} |")
        lines.append("")
    gguf = [r for r in rows if r["kind"] == "gguf"]
    if gguf:
        lines += ["## GGUF export (float32 source)", "",
                  "`secateurs export DIR --gguf OUT.gguf --quant Q`, read back by transformers' own GGUF loader; "
                  "perplexity on the quick protocol's windows against the source folder's (targets: f16 within "
                  "0.5 %, q8_0 within 2 %), and by llama.cpp itself on the same windows (the source's token ids). "
                  "`ids` = the GGUF's tokenizer gives the source's token ids on the first "
                  "20,000 characters of the evaluation text. Channels are cut by fluctuation with bias "
                  "compensation, which gives each `down_proj` a bias: llama.cpp reads it, transformers' GGUF loader "
                  "(5.25) drops it for llama models, hence that column's difference. llama.cpp: llama-cpp-python 0.3.36 built from source "
                  "here (`pip install llama-cpp-python`), 2 threads, prefill of 256 tokens and decode of 64, "
                  "median of 3, without weight repacking (`use_extra_bufts=False`: with it this build crashes on "
                  "every quantized file on this CPU, llama.cpp's own Q4_1 of the built-in model too).", "",
                  "| source | quant | file MiB | source ppl | GGUF ppl (transformers) | difference | ids | "
                  "llama.cpp ppl | difference | llama.cpp prefill tokens/s | decode ms/token |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in gguf:
            for quant, f in r["files"].items():
                speed = f["llama_cpp"] or {}
                lines.append(f"| {r['source']} | {quant} | {_mib(f['bytes'])} | {r['source_perplexity']:.3f} | "
                             f"{f['perplexity']:.3f} | {f['relative'] * 100:+.2f} % | "
                             f"{'same' if f['same_token_ids'] else 'differ'} | "
                             + (f"{speed['perplexity']:.3f} | {(speed['perplexity'] / r['source_perplexity'] - 1) * 100:+.2f} % | "
                                if speed else "— | — | ")
                             + f"{speed.get('prefill_tokens_per_s', '—')} | {speed.get('decode_ms_per_token', '—')} |")
        lines.append("")
    return "\n".join(lines)


def describe(r: dict) -> str:
    if r["kind"] == "size":
        return (f"{r['run']:>14}: linears {r['sparse_storage']['encoded']['ratio']:.4f}, load "
                f"{r['load_median']['dense']:.2f} -> {r['load_median']['sparse']:.2f} s")
    if r["kind"] == "quant":
        return f"{r['run']:>34}: ppl {r['perplexity']:.3f}, linears {r['linears_ratio']:.4f}"
    return f"{r['run']:>20}: source {r['source_perplexity']:.3f}, " + ", ".join(
        f"{q} {f['perplexity']:.3f}" for q, f in r["files"].items())


if __name__ == "__main__":
    sys.exit(benchmark_main(__file__, __doc__, RUNS, "compress", one, markdown, describe))
