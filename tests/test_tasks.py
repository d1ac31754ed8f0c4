"""Zero-shot accuracy through lm-eval-harness on a local task (tests/data/tasks/lastword): checks, the
accuracy against a direct computation, and the commands that report it."""

import csv
import json
from pathlib import Path

import pytest
import torch

from conftest import cli_args
from secateurs import load_model
from secateurs.cli import main
from secateurs.errors import ConfigError
from secateurs.eval.tasks import ZeroShot, headline, zero_shot

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is the optional dependency secateurs[eval]")
TASKS = Path(__file__).parent / "data" / "tasks" / "lastword"
TASK = "secateurs_lastword"


@pytest.mark.parametrize("kwargs, message", [
    ({"tasks": []}, "name at least one lm-eval task"),
    ({"tasks": "arc_easy"}, "a list of names"),
    ({"tasks": ["arc_easy"], "limit": 0}, "limit must be a whole number of examples >= 1, got 0"),
    ({"tasks": ["arc_easy"], "limit": 2.5}, "limit must be a whole number"),
    ({"tasks": ["arc_easy"], "include_path": "/no/such/folder"}, "is not a folder of task YAMLs"),
])
def test_bad_task_settings_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=None) as err:
        ZeroShot(**kwargs)
    assert message in str(err.value)


def test_unknown_task_is_refused_with_the_nearest_names():
    with pytest.raises(ConfigError) as err:
        ZeroShot(["arc_easyy", TASK], str(TASKS)).task_manager()
    assert "knows no task 'arc_easyy' (close: arc_easy" in str(err.value)


def _last_word_oracle(model, tok, docs, max_length):
    """lm-eval's loglikelihood accuracy computed directly: the target's tokens are each the model's argmax."""
    hits = []
    for doc in docs:
        context, target = doc["context"], " " + doc["target"]
        whole = tok(context + target, add_special_tokens=False).input_ids
        n_context = len(tok(context, add_special_tokens=False).input_ids)
        ids = torch.tensor(whole[-(max_length + 1):][:-1])[None]
        cont = whole[n_context:]
        with torch.no_grad():
            greedy = model(ids).logits[0, -len(cont):].argmax(-1).tolist()
        hits.append(greedy == cont)
    return sum(hits) / len(hits)


def test_accuracy_equals_a_direct_computation(tiny_dir):
    model, tok = load_model(str(tiny_dir / "model"))
    scores = zero_shot(model, tok, ZeroShot([TASK], str(TASKS), limit=12))
    docs = [json.loads(line) for line in (TASKS / "lastword.jsonl").read_text().splitlines()[:12]]
    assert scores[TASK]["samples"] == 12
    assert scores[TASK]["acc"] == pytest.approx(_last_word_oracle(model, tok, docs, 256))
    acc = scores[TASK]["acc"]
    assert scores[TASK]["acc_stderr"] == pytest.approx((acc * (1 - acc) / 11) ** 0.5)  # sample standard error
    assert headline(scores)[TASK][0] == "acc" and scores[TASK]["perplexity"] > 1


def test_the_built_in_model_gets_some_last_words_right():
    """A real model on real text: far from the random tiny models' zero (slow-free: 20 examples)."""
    model, tok = load_model()
    scores = zero_shot(model, tok, ZeroShot([TASK], str(TASKS), limit=20))
    assert 0.05 <= scores[TASK]["acc"] <= 0.8


def test_eval_command_reports_accuracy_with_its_standard_error(tiny_dir, tmp_path, capsys):
    report = tmp_path / "r.json"
    code = main(["eval", "--model", str(tiny_dir / "model"), "--quiet", "--data", str(tiny_dir / "test.txt"),
                 "--eval-seqlen", "32", "--eval-windows", "2", "--tasks", TASK, "--include-path", str(TASKS),
                 "--limit", "5", "--report", str(report)])
    assert code == 0
    out = capsys.readouterr().out
    assert f"{TASK} acc: " in out and " ± " in out
    saved = json.loads(report.read_text())
    assert saved["zero_shot"][TASK]["samples"] == 5 and saved["tasks"]["limit"] == 5


@pytest.mark.parametrize("flags, message", [
    (["--tasks", "no_such_task"], "knows no task 'no_such_task'"),
    (["--tasks", TASK, "--limit", "0"], "limit must be a whole number of examples >= 1, got 0"),
    (["--limit", "5"], "--include-path and --limit shape --tasks"),
])
def test_eval_command_refuses_bad_tasks_in_one_line(tiny_dir, flags, message, capsys):
    code = main(["eval", "--model", str(tiny_dir / "model"), "--quiet", "--include-path", str(TASKS), *flags])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_prune_and_sweep_report_zero_shot_scores(tiny_dir, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert main(["prune", *cli_args(tiny_dir), "--method", "magnitude", "--output", str(out), "--tasks", TASK,
                 "--include-path", str(TASKS), "--limit", "4"]) == 0
    printed = capsys.readouterr().out
    assert f"{TASK} acc: " in printed and "(dense " in printed
    report = json.loads((out / "secateurs_report.json").read_text())
    assert report["zero_shot"]["pruned"][TASK]["samples"] == 4 and TASK in report["zero_shot"]["dense"]

    grid = tmp_path / "g.json"
    grid.write_text(json.dumps({
        "base": {"calib_data": str(tiny_dir / "train.txt"), "calib_samples": 4, "calib_seqlen": 32},
        "eval": {"data": str(tiny_dir / "test.txt"), "seqlen": 32, "windows": 2},
        "zero_shot": {"tasks": [TASK], "include_path": str(TASKS), "limit": 4},
        "experiments": {"a": {"method": "magnitude", "sparsity": [0.3, 0.5]}}}))
    assert main(["sweep", str(grid), "--output", str(tmp_path / "sw"), "--model", str(tiny_dir / "model"),
                 "--quiet"]) == 0
    with open(tmp_path / "sw" / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 3 and all(0 <= float(r[f"{TASK}:acc"]) <= 1 and r[f"{TASK}:acc_stderr"] for r in rows)
    assert f"{TASK} acc" in (tmp_path / "sw" / "report.html").read_text()


def test_compare_reports_zero_shot_scores_per_cell(tiny_dir, tmp_path, capsys):
    report = tmp_path / "t.json"
    assert main(["compare", *cli_args(tiny_dir), "--methods", "magnitude", "--sparsities", "0.5", "--tasks", TASK,
                 "--include-path", str(TASKS), "--limit", "3", "--report", str(report)]) == 0
    table = json.loads(report.read_text())
    assert table["dense_zero_shot"][TASK]["samples"] == 3 and table["rows"][0]["zero_shot"][TASK]["samples"] == 3
    assert f"{TASK} acc: " in capsys.readouterr().out
