import re
from pathlib import Path

import pytest
import torch

from secateurs.data import DataError, build_enwiki, calibration_windows, eval_windows, load_text

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "enwiki"


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data/enwiki is not beside the checkout")
def test_builtin_enwiki_is_the_standard_split():
    train, test = build_enwiki()
    assert train == (SHARED / "train.txt").read_text(encoding="utf-8")
    assert test == (SHARED / "test.txt").read_text(encoding="utf-8")


def test_builtin_enwiki_shape():
    train, test = build_enwiki()
    assert train.startswith(" = Anarchism =\n\n") and test.startswith(" = Angolan Armed Forces =\n\n")
    titles = re.compile(r"^ = [^=].* =$", re.MULTILINE)
    assert len(titles.findall(train)) == 83 and len(titles.findall(test)) == 22
    assert len(train) == 2313516 and len(test) == 769451


def test_calibration_windows_follow_the_protocol():
    import random

    ids = torch.arange(1000)
    got = calibration_windows(ids, 4, 50, seed=0)
    random.seed(0)
    starts = [random.randint(0, 1000 - 50 - 1) for _ in range(4)]
    assert got.shape == (4, 50)
    assert got[:, 0].tolist() == starts and torch.equal(got[1], torch.arange(starts[1], starts[1] + 50))
    with pytest.raises(DataError, match="too little calibration text"):
        calibration_windows(ids, 30, 50, seed=0)


def test_eval_windows(caplog):
    ids = torch.arange(100)
    w = eval_windows(ids, 30)
    assert [x.shape[1] for x, _ in w] == [30, 30, 30] and [c for _, c in w] == [0, 0, 0]
    assert len(eval_windows(ids, 30, windows=2)) == 2 and len(eval_windows(ids, 30, windows=3)) == 3
    assert not caplog.records
    assert len(eval_windows(ids, 30, windows=5)) == 3  # all there are, and a warning that says so
    assert caplog.messages == ["the evaluation text holds 3 window(s) of 30 tokens, not the 5 asked for: "
                               "perplexity over those 3"]
    strided = eval_windows(ids, 30, stride=10)
    assert [c for _, c in strided][:3] == [0, 20, 20] and strided[1][0][0, 0] == 10
    with pytest.raises(DataError):
        eval_windows(torch.arange(10), 30)


def test_local_files(tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    assert load_text(tmp_path / "a.txt", "train") == "hello world"
    (tmp_path / "b.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n')
    assert load_text(str(tmp_path / "b.jsonl"), "test") == "one\n\ntwo"
    (tmp_path / "c.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(DataError, match="'text' field"):
        load_text(str(tmp_path / "c.jsonl"), "train")
    with pytest.raises(DataError, match="does not exist"):
        load_text(str(tmp_path / "missing.txt"), "train")
    with pytest.raises(DataError, match="^data file '/dev/null' is not a regular file$"):  # exists, holds no text
        load_text("/dev/null", "train")


@pytest.mark.parametrize("name, content, message", [
    ("d.jsonl", b'{"text": "one"}\n\nnot json\n', "'{}' line 3 is not JSON (Expecting value)"),
    ("e.jsonl", b'{"text": "one"}\n5\n', "'{}': every JSONL line needs a 'text' field (row 2 has none)"),
    ("f.txt", b"caf\xe9 latin-1", "'{}' is not UTF-8 text (byte 3 cannot be decoded)"),
])
def test_unreadable_local_files_say_which_and_where(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError) as info:
        load_text(str(tmp_path / name), "train")
    assert str(info.value) == message.format(tmp_path / name)


def test_eval_windows_with_bos():
    ids = torch.arange(10, 60)
    w = eval_windows(ids, 10, bos=1)
    assert all(x[0, 0] == 1 and x.shape == (1, 10) for x, _ in w)
    assert torch.equal(w[1][0][0, 1:], torch.arange(19, 28)) and len(w) == 5
    s = eval_windows(ids, 10, stride=5, bos=1)
    assert s[1][1] == 5 and torch.equal(s[1][0][0, 1:], torch.arange(15, 24))


def test_bos_follows_the_tokenizer():
    from types import SimpleNamespace

    from secateurs.data.text import bos_id

    class Tok:
        def __init__(self, bos, adds):
            self.bos_token_id, self.adds = bos, adds

        def __call__(self, text):
            return SimpleNamespace(input_ids=([self.bos_token_id] if self.adds else []) + [9])

    assert bos_id(Tok(5, True)) == 5
    assert bos_id(Tok(5, False)) is None
    assert bos_id(Tok(None, False)) is None


def test_datasets_names_need_the_datasets_package(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(DataError, match="pip install datasets"):
        load_text("wikitext", "train")


def test_a_dataset_name_without_a_hub_says_what_to_do_instead(monkeypatch):
    """The real `datasets` path in offline mode: one line that names the dataset and the ways round it."""
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError) as info:
        load_text("wikitext", "train")
    message = str(info.value)
    assert message.startswith("cannot load dataset 'wikitext' split 'train': Couldn't reach 'Salesforce/wikitext'")
    assert message.endswith("(no hub here? give a local .txt or .jsonl file or a dataset folder instead)")
    assert "\n" not in message


def test_a_dataset_name_the_hub_could_not_serve_suggests_offline_mode(monkeypatch):
    import datasets

    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'Salesforce/wikitext' on the Hub (ConnectTimeout)")

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets, "get_dataset_split_names", unreachable)
    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(DataError, match=r"instead; HF_HUB_OFFLINE=1 reads only the local cache, without waiting "
                                        r"for the hub\)$"):
        load_text("wikitext", "train")


# --------------------------------------------------------------------------- Hugging Face datasets, offline

@pytest.fixture
def datasets_cache(tmp_path, monkeypatch):
    """The real ``datasets`` package, with its cache in a temporary folder."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    return datasets


WIKI_ROWS = {"train": ["", " = Train article = \n", " Some train text .\n"],
             "test": ["", " = Test article = \n", " First test line .\n", " Second test line .\n"]}


def test_dataset_repository_by_name_through_load_dataset(tmp_path, monkeypatch, datasets_cache):
    """`wikitext` goes through ``load_dataset(path, name=config, split=...)`` exactly as against the hub; here
    the repository is a local copy with the hub's layout (parquet files per config, configs named in README)."""
    from secateurs.data import text

    repo = tmp_path / "wikitext"
    for split, rows in WIKI_ROWS.items():
        datasets_cache.Dataset.from_dict({"text": rows}).to_parquet(
            repo / "wikitext-2-raw-v1" / f"{split}-00000-of-00001.parquet")
    (repo / "README.md").write_text(
        "---\nconfigs:\n- config_name: wikitext-2-raw-v1\n  data_files:\n"
        "  - split: train\n    path: wikitext-2-raw-v1/train-*\n"
        "  - split: test\n    path: wikitext-2-raw-v1/test-*\n---\n")
    monkeypatch.setitem(text.HF_ALIASES, "wikitext", dict(text.HF_ALIASES["wikitext"], path=str(repo)))
    assert load_text("wikitext", "test") == "\n\n".join(WIKI_ROWS["test"])  # the papers' join, empty rows kept
    assert load_text("wikitext", "train") == "\n\n".join(WIKI_ROWS["train"])


def test_dataset_name_with_data_files_and_a_missing_test_split(tmp_path, monkeypatch, datasets_cache):
    """A name without an alias learns its splits first: `test` falls back to `validation` (C4's layout)."""
    from secateurs.data import text

    repo = tmp_path / "c4like"
    repo.mkdir()
    (repo / "train.jsonl").write_text('{"text": "t1", "url": "u"}\n{"text": "t2", "url": "u"}\n')
    (repo / "validation.jsonl").write_text('{"text": "v1", "url": "u"}\n')
    assert load_text(str(repo), "train") == "t1\n\nt2"  # a folder on disk: load_dataset infers the splits
    assert load_text(str(repo), "test") == "v1"
    monkeypatch.setitem(text.HF_ALIASES, "c4mini", dict(path=str(repo), column="text", splits={},
                                                         data_files={"train": "train.jsonl"}))
    with pytest.raises(DataError, match=r"dataset 'c4mini' has no 'test' split \(splits: train\)"):
        load_text("c4mini", "test")
    assert load_text("c4mini", "train") == "t1\n\nt2"


def test_saved_datasets_and_their_errors(tmp_path, datasets_cache):
    ds = datasets_cache
    ds.DatasetDict({"train": ds.Dataset.from_dict({"text": ["a", "b"]}),
                    "test": ds.Dataset.from_dict({"text": ["c", None, "d"]})}).save_to_disk(tmp_path / "dict")
    assert load_text(tmp_path / "dict", "test") == "c\n\nd"  # None rows are skipped
    ds.Dataset.from_dict({"text": ["only"]}).save_to_disk(tmp_path / "one")
    assert load_text(tmp_path / "one", "train") == load_text(tmp_path / "one", "test") == "only"
    ds.Dataset.from_dict({"body": ["x"]}).save_to_disk(tmp_path / "nocol")
    with pytest.raises(DataError, match=r"has no 'text' column \(columns: body\)"):
        load_text(tmp_path / "nocol", "train")
    ds.DatasetDict({"train": ds.Dataset.from_dict({"text": ["a"]})}).save_to_disk(tmp_path / "trainonly")
    with pytest.raises(DataError, match=r"has no 'test' split \(splits: train\)"):
        load_text(tmp_path / "trainonly", "test")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="cannot load dataset folder"):
        load_text(tmp_path / "empty", "train")
