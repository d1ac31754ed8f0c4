"""Text sources and the token windows cut from them.

A data spec is one of:

* ``enwiki`` (built-in, the default) -- 105 real English Wikipedia articles shipped inside gensim's wheel,
  cleaned WikiText-style (`` = Title =``, `` = = Section = =``) and split at the first article boundary at or
  after 75% of the characters: ``train`` (83 articles) for calibration, ``test`` (22) for perplexity.
  Byte-identical to ``shared/data/enwiki``; cached under ``$SECATEURS_CACHE/data/enwiki``.
* a local ``.txt`` file (used as is) or ``.jsonl`` file (the ``"text"`` field of every line);
* a local folder holding a Hugging Face dataset: a dataset repository on disk (its data files, and the
  ``README.md`` that names its configs, read by ``datasets.load_dataset``) or a ``save_to_disk`` folder
  (``datasets.load_from_disk``);
* ``wikitext`` / ``c4`` or any other Hugging Face ``datasets`` name -- the real ``load_dataset`` path,
  which needs the ``datasets`` package and a reachable hub (or its local cache).

Hugging Face sources give the ``text`` column of the split asked for, rows joined by a blank line.  A
dataset without a ``test`` split (C4 has ``train`` and ``validation``) is evaluated on ``validation``.
"""

from __future__ import annotations

import bz2
import json
import logging
import os
import random
import re
from pathlib import Path

import torch

from .. import atomic
from ..errors import DataError
from ..models.load import cache_dir, first_line

log = logging.getLogger(__name__)

DEFAULT_DATA = "enwiki"
BUILTIN_DATA = ("enwiki",)
HF_ALIASES = {
    "wikitext": dict(path="Salesforce/wikitext", name="wikitext-2-raw-v1", column="text", splits={"train": "train", "test": "test"}),
    "c4": dict(path="allenai/c4", data_files={"train": "en/c4-train.00000-of-01024.json.gz",
                                                 "test": "en/c4-validation.00000-of-00008.json.gz"},
               column="text", splits={"train": "train", "test": "test"}),
}
_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1$")


# --------------------------------------------------------------------------- built-in enwiki

def clean_wiki_article(title: str, text: str) -> str:
    """One article, filtered by gensim, in WikiText style: headings `` = = Name = =``, blank-line paragraphs."""
    text = text.replace("'''", "").replace("''", "")  # bold / italic markup that filter_wiki leaves in
    text = re.sub(r"\n{3,}", "\n\n", text.strip())
    lines = [f" = {title} =", ""]
    after_heading = False  # blank lines right after a heading are dropped
    for line in text.split("\n"):
        line = line.rstrip(" \t")  # not str.rstrip(): a non-breaking space is kept as text
        heading = _HEADING.match(line.strip())
        if heading:
            marks = " ".join("=" * len(heading[1]))
            lines.append(f" {marks} {heading[2]} {marks}")
            after_heading = True
        elif line:
            lines.append(line)
            after_heading = False
        elif not after_heading and len(lines) > 2:
            lines.append("")
    if after_heading:  # an article ending in a heading ends on a single newline
        return "\n".join(lines) + "\n"
    while lines[-1] == "":
        lines.pop()
    return "\n".join(lines) + "\n\n"


def build_enwiki() -> tuple[str, str]:
    """Extract, clean and split the Wikipedia dump bundled with gensim: ``(train, test)``."""
    try:
        import gensim
        from gensim.corpora.wikicorpus import extract_pages, filter_wiki
    except ImportError as exc:
        raise DataError("built-in data 'enwiki' needs gensim: pip install gensim") from exc
    dump = Path(gensim.__file__).parent / "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
    articles = []
    with bz2.open(dump) as fh:
        for title, raw, _page_id in extract_pages(fh):
            if raw.lstrip().lower().startswith("#redirect"):
                continue
            body = filter_wiki(raw)
            if len(body) < 500:
                continue
            articles.append(clean_wiki_article(title, body))
    total = sum(map(len, articles))
    seen = 0
    for split, article in enumerate(articles):
        if seen >= 0.75 * total:
            break
        seen += len(article)
    return "".join(articles[:split]), "".join(articles[split:])


def _enwiki(split: str) -> str:
    folder = cache_dir() / "data" / "enwiki"
    path = folder / f"{split}.txt"
    if not path.exists():
        train, test = build_enwiki()
        try:
            for name, text in (("train", train), ("test", test)):
                atomic.write_text(folder / f"{name}.txt", text)
        except OSError as exc:  # a read-only home, a full disk: the text is here all the same
            log.warning("cannot cache the built-in text in %s (%s); it will be extracted again next time "
                        "unless SECATEURS_CACHE names a folder that can be written", folder, first_line(exc))
            return train if split == "train" else test
    return path.read_text(encoding="utf-8")


def datasets_module(name: str):
    try:
        import datasets
    except ImportError as exc:
        raise DataError(f"data {name!r} is a Hugging Face dataset and needs: pip install datasets") from exc
    return datasets


def _column_text(ds, name: str, split: str, column: str) -> str:
    if column not in ds.column_names:
        raise DataError(f"dataset {name!r} split {split!r} has no {column!r} column (columns: "
                        f"{', '.join(ds.column_names)})")
    rows = [t for t in ds[column] if t is not None]
    if bad := next((t for t in rows if not isinstance(t, str)), None):
        raise DataError(f"dataset {name!r} split {split!r}: its {column!r} column holds {type(bad).__name__} "
                        f"values, not text")
    return "\n\n".join(rows)


def _pick_split(splits, name: str, split: str) -> str:
    """``split`` itself, or ``validation`` standing in for a missing ``test`` split."""
    if split in splits:
        return split
    if split == "test" and "validation" in splits:
        log.info("dataset %s has no test split; evaluating on its validation split", name)
        return "validation"
    raise DataError(f"dataset {name!r} has no {split!r} split (splits: {', '.join(splits)})")


def _hf_dataset(name: str, split: str) -> str:
    """A dataset by hub name (or an alias of one) through ``datasets.load_dataset``."""
    datasets = datasets_module(name)
    alias = HF_ALIASES.get(name, dict(path=name, column="text", splits={}))
    kwargs = {k: alias[k] for k in ("name", "data_files") if k in alias}
    try:
        chosen = alias["splits"].get(split)
        if chosen is None:  # learn the splits first, so that `test` can fall back to `validation`
            splits = datasets.get_dataset_split_names(alias["path"], kwargs.get("name"),
                                                       data_files=kwargs.get("data_files"))
            chosen = _pick_split(splits, name, split)
        ds = datasets.load_dataset(alias["path"], split=chosen, **kwargs)
    except DataError:
        raise
    except Exception as exc:
        hint = ""
        if isinstance(exc, ConnectionError):  # what `datasets` raises when neither the hub nor its cache has it
            hint = " (no hub here? give a local .txt or .jsonl file or a dataset folder instead"
            if not getattr(datasets.config, "HF_HUB_OFFLINE", False):
                hint += "; HF_HUB_OFFLINE=1 reads only the local cache, without waiting for the hub"
            hint += ")"
        raise DataError(f"cannot load dataset {name!r} split {split!r}: {first_line(exc)}{hint}") from exc
    return _column_text(ds, name, split, alias["column"])


def _dataset_folder(folder: Path, split: str) -> str:
    """A dataset on disk: a ``save_to_disk`` folder, or a dataset repository's files (``load_dataset``)."""
    name = str(folder)
    datasets = datasets_module(name)
    try:
        if (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file():
            ds = datasets.load_from_disk(name)  # a single saved Dataset has no splits: it is used whole
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[_pick_split(list(ds), name, split)]
        else:
            ds = datasets.load_dataset(name, split=_pick_split(datasets.get_dataset_split_names(name), name, split))
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"cannot load dataset folder {name!r} split {split!r}: {first_line(exc)}") from exc
    return _column_text(ds, name, split, "text")


def load_text(spec: "str | os.PathLike | None", split: str) -> str:
    """The raw text of a data spec (see the module docstring). ``split`` is ``train`` or ``test``;
    local files have no splits and are used whole."""
    spec = str(spec) if spec is not None else DEFAULT_DATA
    if spec in BUILTIN_DATA:
        return _enwiki(split)
    path = Path(spec).expanduser()
    if path.is_dir():
        return _dataset_folder(path, split)
    if path.suffix in (".txt", ".jsonl") or path.exists():
        if not path.is_file():
            raise DataError(f"data file {spec!r} " + ("is not a regular file" if path.exists() else "does not exist"))
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{spec!r} is not UTF-8 text (byte {exc.start} cannot be decoded)") from None
        return _jsonl_text(spec, text) if path.suffix == ".jsonl" else text
    return _hf_dataset(spec, split)


def jsonl_rows(spec: str, text: str) -> list:
    """``[(line number, value)]`` of a JSONL file's non-blank lines; a line that is not JSON is named."""
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append((number, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise DataError(f"{spec!r} line {number} is not JSON ({exc.msg})") from None
    return rows


def _jsonl_text(spec: str, text: str) -> str:
    """The ``"text"`` fields of a JSONL file's lines, joined by blank lines."""
    rows = [row for _, row in jsonl_rows(spec, text)]
    if not rows:
        raise DataError(f"{spec!r}: every JSONL line needs a 'text' field, and the file has no line")
    for number, row in enumerate(rows, 1):  # checked as read: a number or null is no text to tokenize
        if not isinstance(row, dict) or "text" not in row:
            raise DataError(f"{spec!r}: every JSONL line needs a 'text' field (row {number} has none)")
        if not isinstance(row["text"], str):
            raise DataError(f"{spec!r}: row {number}'s 'text' is {type(row['text']).__name__} "
                            f"{json.dumps(row['text'])[:40]}, not a string")
    return "\n\n".join(r["text"] for r in rows)


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Token ids of the whole text with the tokenizer's own defaults, as a 1-D long tensor."""
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # silence "sequence longer than model max length"
    try:
        ids = tokenizer(text, return_tensors="pt").input_ids[0]
    finally:
        transformers.logging.set_verbosity(verbosity)
    return ids


def calibration_windows(ids: torch.Tensor, samples: int, seqlen: int, seed: int) -> torch.Tensor:
    """``samples`` random windows of ``seqlen`` tokens, ``(samples, seqlen)``.

    Exactly the reference protocol: ``random.seed(seed)``, then for each window
    ``start = random.randint(0, len(ids) - seqlen - 1)``.
    """
    if samples < 1 or seqlen < 1:
        raise DataError(f"calibration needs samples >= 1 and seqlen >= 1, got {samples} x {seqlen}")
    if len(ids) < max(samples * seqlen, seqlen + 2):
        raise DataError(f"too little calibration text: {len(ids)} tokens for {samples} samples x {seqlen} tokens")
    rng = random.Random(seed)
    starts = [rng.randint(0, len(ids) - seqlen - 1) for _ in range(samples)]
    return torch.stack([ids[s : s + seqlen] for s in starts])


def bos_id(tokenizer) -> "int | None":
    """The BOS id if this tokenizer puts one in front of every text by default (Gemma, Llama 2...), else None."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a").input_ids
    return bos if ids and ids[0] == bos else None


def eval_windows(ids: torch.Tensor, seqlen: int, windows: "int | None" = None, stride: "int | None" = None,
                 bos: "int | None" = None):
    """Windows for perplexity: ``[(input_ids (1, L), n_context)]``; the first ``n_context`` tokens of each
    window are context only (not scored).  Non-overlapping by default (``stride = seqlen``).

    With ``bos`` (models whose tokenizer starts every text with BOS), every window starts with BOS followed
    by ``seqlen - 1`` text tokens, as the model saw text in training; ``ids`` must then hold no BOS.
    """
    stride = stride or seqlen
    if not 0 < stride <= seqlen:
        raise DataError(f"eval stride must be in 1..seqlen ({seqlen}), got {stride}")
    body = seqlen - (bos is not None)
    stride = min(stride, body)
    if len(ids) < body:
        raise DataError(f"too little evaluation text: {len(ids)} tokens for one window of {seqlen}")
    prefix = torch.tensor([bos], dtype=ids.dtype) if bos is not None else ids[:0]
    out = []
    for start in range(0, len(ids) - body + 1, stride):
        window = torch.cat([prefix, ids[start : start + body]]).unsqueeze(0)
        out.append((window, 0 if start == 0 else len(prefix) + body - stride))
        if windows is not None and len(out) == windows:
            break
    if windows is not None and len(out) < windows:  # the figure then covers less text than asked: say so
        log.warning("the evaluation text holds %d window(s) of %d tokens, not the %d asked for: perplexity over "
                    "those %d", len(out), seqlen, windows, len(out))
    return out
