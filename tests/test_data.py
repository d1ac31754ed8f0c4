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
