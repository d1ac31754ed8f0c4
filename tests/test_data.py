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


def test_eval_windows():
    ids = torch.arange(100)
    w = eval_windows(ids, 30)
    assert [x.shape[1] for x, _ in w] == [30, 30, 30] and [c for _, c in w] == [0, 0, 0]
    assert len(eval_windows(ids, 30, windows=2)) == 2
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
