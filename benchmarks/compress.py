"""Compressed sparse checkpoints on the built-in model: bytes on disk and load time against the dense save.

    python benchmarks/compress.py                  # every run below, ~5 min on 2 CPU cores
    python benchmarks/compress.py --runs wanda:2:4

Each run, in a fresh process: SmolLM2-135M (built-in) in bfloat16, pruned by the method at the setting with the
quick protocol's calibration (32 x 512 tokens of enwiki train, seed 0); saved twice, dense (``save_pretrained``,
what ``--save-format dense`` writes) and compressed (``--save-format sparse``); then

* bytes: the safetensors files of each folder, and the pruned linears alone (their encoded parts against
  their dense bytes), from :func:`secateurs.export.compressed.storage_of`;
* load time: ``secateurs.load_model(folder)`` of each (weights and tokenizer, from the page cache), alternated,
  median of 5;
* the two loaded models are checked bit for bit equal, and their perplexity on 4 x 1024 tokens of enwiki test
  is measured (the same figure, or the run fails);
* ``secateurs decompress`` wall time.

Results go to ``benchmarks/results/compress.{json,md}``.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import benchmark_main, measured_on, protocol_config

RUNS = ["wanda:0.5", "wanda:2:4", "wanda:0.7", "wanda:4:8", "sparsegpt:0.5"]
TARGET = {"0.5": 0.57, "2:4": 0.57, "0.7": 0.37}  # issue 23: pruned linears' bytes / dense, bf16
LOADS = 5


def one(run: str) -> dict:
    import torch

    from secateurs import EvalConfig, calibration_data, evaluate, load_model, prune, save_model
    from secateurs.api import environment
    from secateurs.data import load_text, tokenize
    from secateurs.export.compressed import compressible, decompress, storage_of

    torch.set_num_threads(2)
    torch.manual_seed(0)
    method, setting = run.split(":", 1)
    model, tok = load_model("smollm2-135m", torch.bfloat16)
    cfg = protocol_config(method, setting)
    result = prune(model, cfg, calibration_data(tok, cfg), progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        dense, packed = Path(tmp) / "dense", Path(tmp) / "sparse"
        save_model(model, tok, dense)
        t = time.perf_counter()
        save_model(model, tok, packed, compress=compressible(result))
        save_seconds = time.perf_counter() - t
        del model
        times = {"dense": [], "sparse": []}
        for _ in range(LOADS):
            for name, folder in (("dense", dense), ("sparse", packed)):
                t = time.perf_counter()
                loaded, _ = load_model(str(folder))
                times[name].append(time.perf_counter() - t)
                del loaded
        a, b = load_model(str(dense))[0], load_model(str(packed))[0]
        sa, sb = a.state_dict(), b.state_dict()
        if sa.keys() != sb.keys() or not all(torch.equal(sa[k].view(torch.uint8), sb[k].view(torch.uint8))
                                             for k in sa if sa[k].is_floating_point()):
            raise SystemExit("the compressed checkpoint does not load as the dense one")
        ids = tokenize(tok, load_text("enwiki", "test"))
        ppl = [evaluate(m, tok, EvalConfig(seqlen=1024, windows=4), ids=ids, progress=False) for m in (a, b)]
        if ppl[0] != ppl[1]:
            raise SystemExit(f"perplexity differs: {ppl}")
        t = time.perf_counter()
        decompress(packed, Path(tmp) / "back")
        decompress_seconds = time.perf_counter() - t
        return {"run": run, "method": method, "setting": setting, "sparsity": result.sparsity,
                "dense_storage": storage_of(dense), "sparse_storage": storage_of(packed),
                "load_seconds": {k: [round(x, 3) for x in v] for k, v in times.items()},
                "load_median": {k: round(statistics.median(v), 3) for k, v in times.items()},
                "save_sparse_seconds": round(save_seconds, 2), "decompress_seconds": round(decompress_seconds, 2),
                "perplexity_4x1024": ppl[1], **environment()}


def markdown(rows: list[dict], command: str) -> str:
    lines = ["# Compressed sparse checkpoints (SmolLM2-135M, bfloat16)", "", measured_on(rows[0]), "",
             "Each model pruned with the quick protocol's calibration (32 x 512 tokens of enwiki train, seed 0), "
             "then saved dense and with `--save-format sparse` ([the format](../../docs/format.md)). "
             "`linears` = the pruned weight matrices' bytes against their dense bytes (the target column is "
             "issue 23's); `checkpoint` = every safetensors byte of the folder (the embeddings, 28 % of the model, "
             "stay dense); load = `secateurs.load_model(folder)`, weights and tokenizer from the page cache, "
             f"median of {LOADS} alternated loads. Both folders load to the same weights bit for bit and the same "
             "perplexity (4 x 1024 tokens of enwiki test: the column), checked in the run.", "",
             f"Reproduce: `{command}`", "",
             "| method | setting | sparsity | encoding | linears: dense MiB | sparse MiB | ratio | target | "
             "checkpoint: dense MiB | sparse MiB | ratio | load dense s | load sparse s | ratio | ppl |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        e, d, s = r["sparse_storage"]["encoded"], r["dense_storage"], r["sparse_storage"]
        target = TARGET.get(r["setting"])
        lines.append(
            f"| {r['method']} | {r['setting']} | {r['sparsity']:.3f} | {', '.join(e['encodings'])} | "
            f"{e['dense_bytes'] / 2**20:.1f} | {e['bytes'] / 2**20:.1f} | {e['ratio']:.4f} | "
            f"{'≤ %.2f' % target if target else '—'} | {d['weight_bytes'] / 2**20:.1f} | "
            f"{s['weight_bytes'] / 2**20:.1f} | {s['weight_bytes'] / d['weight_bytes']:.3f} | "
            f"{r['load_median']['dense']:.2f} | {r['load_median']['sparse']:.2f} | "
            f"{r['load_median']['sparse'] / r['load_median']['dense']:.2f} | {r['perplexity_4x1024']:.2f} |")
    lines += ["", "Every load (s): " + "; ".join(
        f"{r['run']} dense {r['load_seconds']['dense']}, sparse {r['load_seconds']['sparse']}" for r in rows),
        "", "Saving compressed (dense files written, then re-stored) and `secateurs decompress`: " + "; ".join(
        f"{r['run']} {r['save_sparse_seconds']} s / {r['decompress_seconds']} s" for r in rows), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(benchmark_main(__file__, __doc__, RUNS, "compress", one, markdown,
                            lambda r: f"{r['run']:>14}: linears {r['sparse_storage']['encoded']['ratio']:.4f}, "
                                      f"load {r['load_median']['dense']:.2f} -> {r['load_median']['sparse']:.2f} s"))
