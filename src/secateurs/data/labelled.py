"""Labelled text for sequence classification: examples, label sets and padded batches.

A source is a local ``.jsonl`` file (one ``{"text": ..., "label": ...}`` per line), a local ``.csv`` file with
``text`` and ``label`` columns, or a Hugging Face dataset (a name or a folder on disk, its ``text`` or
``sentence`` column and its ``label`` column; the split asked for).  Labels are integers (class ids) or strings
(class names); anything else is refused, naming the row.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import DataError
from ..models.load import first_line
from .text import BUILTIN_DATA, datasets_module, jsonl_rows

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Examples:
    """Texts and their labels, as read (ints or strings), from ``source``."""

    texts: list
    labels: list
    source: str

    def __len__(self):
        return len(self.texts)


def _check_label(label, where: str):
    if isinstance(label, bool) or not isinstance(label, (int, str)):
        raise DataError(f"{where}: label {json.dumps(label)[:40]} is {type(label).__name__}; labels must be "
                        "integers (class ids) or strings (class names)")
    return label


def _rows_csv(path: Path) -> list:
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(enumerate(csv.DictReader(fh), 2))
    out = []
    for number, row in rows:  # a CSV holds strings: a whole number is a class id
        label = row.get("label")
        out.append((number, {**row, "label": int(label) if label is not None and label.lstrip("-").isdigit()
                             else label}))
    return out


def _rows_dataset(spec: str, split: str) -> list:
    datasets = datasets_module(spec)
    try:
        path = Path(spec)
        ds = datasets.load_from_disk(spec) if (path / "dataset_dict.json").is_file() else None
        ds = ds[split] if ds is not None else datasets.load_dataset(spec, split=split)
    except Exception as exc:
        raise DataError(f"cannot load dataset {spec!r} split {split!r}: {first_line(exc)}") from exc
    column = "text" if "text" in ds.column_names else "sentence"
    return [(k, {"text": r.get(column), "label": r.get("label")}) for k, r in enumerate(ds, 1)]


def is_labelled_file(spec) -> bool:
    """Does ``spec`` name a local ``.jsonl`` or ``.csv`` file (one example per row)?"""
    return Path(str(spec)).expanduser().suffix in (".jsonl", ".csv")


def _rows(spec: str, split: str) -> list:
    """``[(row number, row)]`` of a source of examples, each checked to hold a ``text`` string."""
    if spec in BUILTIN_DATA:
        raise DataError(f"{spec!r} is unlabelled text: accuracy and classification need labelled examples, a "
                        ".jsonl or .csv file with text and label (--eval-data, --data)")
    path = Path(spec).expanduser()
    if path.suffix in (".jsonl", ".csv") and not path.is_file():
        raise DataError(f"data file {spec!r} does not exist")
    if path.is_file() and path.suffix not in (".jsonl", ".csv"):
        raise DataError(f"{spec!r} is not labelled: labelled examples come from a .jsonl or .csv file with text "
                        "and label, or a datasets name or folder")
    rows = jsonl_rows(spec, path.read_text(encoding="utf-8")) if path.suffix == ".jsonl" else \
        _rows_csv(path) if path.suffix == ".csv" else _rows_dataset(spec, split)
    if not rows:
        raise DataError(f"{spec!r} holds no example")
    for number, row in rows:
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise DataError(f"{spec!r} row {number}: every example needs a 'text' string and a 'label'")
    return rows


def example_texts(spec: "str | os.PathLike", split: str = "train") -> list:
    """The texts of ``spec``'s examples, labelled or not (calibration needs no labels)."""
    return [row["text"] for _, row in _rows(str(spec), split)]


def load_examples(spec: "str | os.PathLike", split: str = "train") -> Examples:
    """The labelled examples of ``spec`` (see the module docstring); local files have no splits."""
    spec = str(spec)
    texts, labels = [], []
    for number, row in _rows(spec, split):
        where = f"{spec!r} row {number}"
        if "label" not in row or row["label"] is None:
            raise DataError(f"{where}: no 'label'")
        texts.append(row["text"])
        labels.append(_check_label(row["label"], where))
    return Examples(texts, labels, spec)


def label_ids(examples: Examples, label2id: "dict | None", num_labels: int, what: str) -> torch.Tensor:
    """The examples' labels as class ids of a model with ``num_labels`` classes named by ``label2id``: names
    are looked up there, ids checked against the number of classes."""
    out = []
    for label in examples.labels:
        if isinstance(label, str):
            if not label2id or label not in label2id:
                known = ", ".join(map(str, label2id)) if label2id else "none"
                raise DataError(f"{examples.source!r}: label {label!r} is not a class of {what} (its classes: "
                                f"{known})")
            out.append(label2id[label])
        else:
            if not 0 <= label < num_labels:
                raise DataError(f"{examples.source!r}: label {label} is not a class id of {what}, which has "
                                f"{num_labels} classes (0-{num_labels - 1})")
            out.append(label)
    return torch.tensor(out)


def label_set(train: Examples, evaluation: "Examples | None" = None) -> list:
    """The classes of a training set, sorted (ids, or names); an evaluation set must use the same."""
    kinds = {type(x) for x in train.labels}
    if len(kinds) > 1:
        raise DataError(f"{train.source!r} mixes integer and string labels")
    classes = sorted(set(train.labels))
    if evaluation is not None:
        if extra := sorted(set(evaluation.labels) - set(classes), key=str):
            raise DataError(f"{evaluation.source!r} has labels the training set {train.source!r} lacks: "
                            f"{', '.join(map(str, extra[:5]))} (training classes: {', '.join(map(str, classes))})")
    return classes


def encode(tokenizer, texts: list, max_length: int) -> list:
    """The token ids of every text, cut at ``max_length`` (with the tokenizer's own end tokens kept); one
    warning says how many were cut."""
    if long := sum(len(ids) > max_length for ids in tokenizer(texts)["input_ids"]):
        log.warning("%d of %d texts are longer than the model's %d positions and were truncated", long, len(texts),
                    max_length)
    return tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]


def pad(tokenizer, ids: list) -> tuple:
    """``(input_ids, attention_mask)`` of a batch of token-id lists, padded to the longest."""
    batch = tokenizer.pad({"input_ids": ids}, return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"]


def batches(tokenizer, texts: list, batch_size: int, max_length: int):
    """Padded batches ``(input_ids, attention_mask)`` of ``texts`` in order, each cut as :func:`encode` cuts."""
    ids = encode(tokenizer, texts, max_length)
    for start in range(0, len(ids), batch_size):
        yield pad(tokenizer, ids[start:start + batch_size])


def calibration_examples(model, tokenizer, texts: list, samples: int, seqlen: int, seed: int) -> torch.Tensor:
    """An encoder's calibration: ``samples`` of ``texts`` drawn at random (seeded; all of them if fewer), each
    encoded as the model reads an example (with its special tokens, cut at ``seqlen`` or the model's positions),
    one per row, padded to the longest with the model's pad token: ``(samples, longest)`` token ids.  The
    calibration engine masks the padding in attention and leaves it out of every statistic
    (:func:`~secateurs.engine.capture.padding_of`)."""
    pad_id = getattr(model.config, "pad_token_id", None)
    if pad_id is None:
        raise DataError(f"{type(model).__name__}'s config has no pad_token_id: examples of different lengths cannot "
                        "be batched for calibration (set it, or calibrate on plain text windows)")
    chosen = random.Random(seed).sample(range(len(texts)), min(samples, len(texts)))
    ids = encode(tokenizer, [texts[k] for k in chosen], min(seqlen, max_positions(model, tokenizer)))
    out = torch.full((len(ids), max(map(len, ids))), pad_id, dtype=torch.long)
    for row, x in zip(out, ids):
        row[: len(x)] = torch.tensor(x)
    return out


def max_positions(model, tokenizer) -> int:
    """The longest input the model takes: its position table, or the tokenizer's limit if smaller."""
    config = model.config
    limit = getattr(config, "max_position_embeddings", None) or 512
    if getattr(config, "model_type", None) == "roberta":  # RoBERTa's positions start after the padding index
        limit -= getattr(config, "pad_token_id", 1) + 1
    own = getattr(tokenizer, "model_max_length", None)
    return min(limit, own) if isinstance(own, int) and 0 < own < 10**6 else limit
