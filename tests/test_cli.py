import json
from datetime import datetime

import pytest
import torch
import transformers as tf
from safetensors import SafetensorError

from conftest import cli_args as args
from secateurs.cli import main


def test_version_and_help_name_the_commands(capsys):
    import secateurs

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"secateurs {secateurs.__version__}\n"
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps it to the terminal's width
    assert ("Prune transformers and measure what it cost: prune, eval, compare, sweep, sensitivity, finetune, iterate, "
            "decompress, export.") in help_text


def test_prune_writes_model_and_report(tiny_dir, tmp_path, capsys):
    out, report = tmp_path / "pruned", tmp_path / "report.json"
    code = main(["prune", *args(tiny_dir, "--method", "sparsegpt", "--pattern", "2:4", "--output", str(out),
                                "--report", str(report))])
    assert code == 0
    printed = capsys.readouterr().out
    assert "dense perplexity" in printed and "measured sparsity 0.5000" in printed
    r = json.loads(report.read_text())
    for key in ("dense_perplexity", "perplexity", "sparsity", "prune_seconds", "peak_rss_bytes", "per_layer",
                "zero_params", "nonzero_params", "total_params", "config", "seed", "versions", "stage", "measured_at"):
        assert key in r, key
    assert datetime.fromisoformat(r["measured_at"]).tzinfo is not None
    assert r["sparsity"] == pytest.approx(0.5) and r["stage"] == "complete" and r["config"]["pattern"] == "2:4"
    assert r["config"]["true_sequential"] is None  # left to the method, and reported as resolved
    assert r["config"]["resolved"]["true_sequential"] is True  # sparsegpt's default
    assert len(r["per_layer"]) == 14 and r["zero_params"] + r["nonzero_params"] == r["total_params"]
    assert r["dense_perplexity"] > 1 and r["perplexity"] > 1
    model = tf.AutoModelForCausalLM.from_pretrained(out)  # plain transformers
    assert (model.model.layers[1].mlp.down_proj.weight == 0).float().mean() == 0.5
    assert (out / "secateurs_report.json").is_file() and (out / "secateurs_recipe.yaml").is_file()


def test_no_true_sequential_flag(tiny_dir, tmp_path):
    report = tmp_path / "r.json"
    assert main(["prune", *args(tiny_dir, "--method", "sparsegpt", "--no-true-sequential", "--no-eval",
                                "--output", str(tmp_path / "o"), "--report", str(report))]) == 0
    assert json.loads(report.read_text())["config"]["true_sequential"] is False


def test_refine_flags(tiny_dir, tmp_path):
    report = tmp_path / "r.json"
    assert main(["prune", *args(tiny_dir, "--method", "magnitude", "--refine", "admm", "--refine-iters", "5",
                                "--no-eval", "--output", str(tmp_path / "o"), "--report", str(report))]) == 0
    r = json.loads(report.read_text())
    assert (r["config"]["refine"], r["config"]["refine_iters"], r["config"]["refine_damp"]) == ("admm", 5, None)
    assert (r["config"]["resolved"]["refine_iters"], r["config"]["resolved"]["refine_damp"]) == (5, 0.1)
    assert abs(r["sparsity"] - 0.5) < 1e-3


def test_eval_and_compare(tiny_dir, tmp_path, capsys):
    flags = ["--model", str(tiny_dir / "model"), "--quiet", "--data", str(tiny_dir / "test.txt"), "--eval-seqlen",
             "32", "--eval-windows", "2"]
    assert main(["eval", *flags]) == 0  # streamed from the safetensors folder
    streamed = capsys.readouterr().out
    assert main(["eval", *flags, "--no-stream"]) == 0
    assert streamed.startswith("perplexity:") and capsys.readouterr().out == streamed
    md, js = tmp_path / "t.md", tmp_path / "t.json"
    code = main(["compare", *args(tiny_dir, "--methods", "magnitude,wanda,magnitude+admm", "--sparsities",
                                  "0.5,2:4", "--markdown", str(md), "--report", str(js))])
    assert code == 0
    table = json.loads(js.read_text())
    assert [(r["method"], r["setting"]) for r in table["rows"]] == [
        ("magnitude", "0.5"), ("magnitude", "2:4"), ("wanda", "0.5"), ("wanda", "2:4"),
        ("magnitude+admm", "0.5"), ("magnitude+admm", "2:4")]
    assert all(abs(r["sparsity"] - 0.5) < 1e-3 for r in table["rows"])
    ppl = {(r["method"], r["setting"]): r["perplexity"] for r in table["rows"]}
    assert ppl[("magnitude+admm", "0.5")] != ppl[("magnitude", "0.5")]  # the row really was refined
    text = md.read_text()
    assert text.startswith("| method | 0.5 | 2:4 |") and "| dense |" in text and "| magnitude+admm |" in text


@pytest.mark.parametrize("how", ["streamed", "--no-stream"])
def test_an_interrupted_compare_keeps_its_cells_and_resumes(tiny_dir, tmp_path, capsys, monkeypatch, how):
    import tempfile

    import secateurs.api as api

    grid = ["--methods", "magnitude,wanda", "--sparsities", "0.5,2:4"]
    whole, part, md = tmp_path / "whole.json", tmp_path / "part.json", tmp_path / "part.md"
    # the reference is in memory: a streamed table must hold the same figures
    assert main(["compare", *args(tiny_dir, *grid, "--no-stream", "--report", str(whole))]) == 0
    expected = json.loads(whole.read_text())
    assert expected["complete"] is True

    flags = [*grid, *([how] if how != "streamed" else [])]
    patched = "prune_streamed" if how == "streamed" else "prune"
    real_prune, calls = getattr(api, patched), []

    def prune_then_stop(*a, **k):  # Ctrl-C during the third cell
        calls.append(a[1].method)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_prune(*a, **k)

    monkeypatch.setattr(api, patched, prune_then_stop)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # where streamed cells are written
    (tmp_path / "tmp").mkdir()
    assert main(["compare", *args(tiny_dir, *flags, "--report", str(part), "--markdown", str(md))]) == 130
    assert "add --resume" in capsys.readouterr().err
    assert list((tmp_path / "tmp").iterdir()) == []  # no cell's model left behind
    saved = json.loads(part.read_text())
    assert saved["complete"] is False and saved["dense_perplexity"] == expected["dense_perplexity"]
    assert [(r["method"], r["setting"]) for r in saved["rows"]] == [("magnitude", "0.5"), ("magnitude", "2:4")]
    assert "| wanda | – | – |" in md.read_text()

    calls.clear()
    assert main(["compare", *args(tiny_dir, *flags, "--report", str(part), "--resume")]) == 0
    assert calls == ["wanda", "wanda"]  # only the missing cells were measured
    resumed = json.loads(part.read_text())
    assert resumed["complete"] is True
    assert [(r["method"], r["setting"], r["perplexity"], r["sparsity"]) for r in resumed["rows"]] == [
        (r["method"], r["setting"], r["perplexity"], r["sparsity"]) for r in expected["rows"]]
    assert list((tmp_path / "tmp").iterdir()) == []


def test_a_kill_while_saving_leaves_no_folder_behind(tiny_dir, tmp_path, capsys, monkeypatch):
    import os
    import signal

    real_save = tf.PreTrainedModel.save_pretrained

    def save_then_get_killed(self, folder, *a, **k):  # half the files written, then `kill`
        real_save(self, folder, *a, **k)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(tf.PreTrainedModel, "save_pretrained", save_then_get_killed)
    handler = signal.getsignal(signal.SIGTERM)
    code = main(["prune", *args(tiny_dir, "--method", "magnitude", "--no-eval", "--no-stream", "--output",
                                str(tmp_path / "out"))])
    assert code == 128 + signal.SIGTERM
    assert "secateurs: terminated; nothing was saved" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its temporary sibling
    assert signal.getsignal(signal.SIGTERM) is handler  # main() put the previous handler back


@pytest.mark.parametrize("extra, message", [
    (["--calib-samples", "3"], "calib_samples=4 there, 3 here"),
    (["--eval-windows", "2"], "windows=3 there, 2 here"),
    (["--model", "elsewhere"], "is a table of model"),
])
def test_resume_refuses_a_table_made_otherwise(tiny_dir, tmp_path, capsys, extra, message):
    report = tmp_path / "t.json"
    grid = ["--methods", "magnitude", "--sparsities", "0.5", "--report", str(report)]
    assert main(["compare", *args(tiny_dir, *grid)]) == 0
    capsys.readouterr()
    assert main(["compare", *args(tiny_dir, *grid, "--resume", *extra)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("secateurs: error: cannot resume") and message in err and "\n" not in err


def test_compare_checks_every_cell_against_the_model_before_measuring_any(tiny_dir, tmp_path, capsys):
    report = tmp_path / "t.json"
    code = main(["compare", *args(tiny_dir, "--methods", "magnitude,wanda", "--sparsities", "0.5,block:48",
                                  "--report", str(report))])
    printed = capsys.readouterr()
    assert code == 2 and "block size 48 does not tile" in printed.err
    assert not report.exists() and "perplexity" not in printed.out  # not even the dense row was measured


def test_resume_needs_a_report(tiny_dir, capsys):
    assert main(["compare", *args(tiny_dir, "--methods", "magnitude", "--resume")]) == 2
    assert "--resume needs --report" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["compare", "--methods", "wanda,sparsegpt", "--percdamp", "0.05", "--blocksize", "64"],
    ["compare", "--methods", "wanda,magnitude+admm", "--refine-iters", "5"],
    ["prune", "--method", "wanda", "--refine", "admm", "--refine-damp", "0.2", "--output", "unused"],
    ["iterate", "--method", "sparsegpt", "--percdamp", "0.05", "--sparsities", "0.3", "--steps-per-cycle", "1",
     "--output", "unused"],
])
def test_a_narrow_flag_passes_when_some_config_reads_it(tmp_path, capsys, argv):
    """The flag check lets these through; the run then stops at the missing model, before any work."""
    argv = [str(tmp_path / "out") if a == "unused" else a for a in argv]
    assert main([*argv, "--model", str(tmp_path / "missing-model"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "no such file or folder" in err and "read only with" not in err


@pytest.mark.parametrize("extra, message", [
    (["--sparsity", "1.5"], "sparsity must be in [0, 1)"),
    (["--pattern", "4:4"], "N < M"),
    (["--pattern", "2:4", "--sparsity", "0.7"], "contradicts pattern 2:4"),
    (["--method", "obs"], "unknown 'obs'"),
    (["--pattern", "block:48"], "does not tile"),
    (["--pattern", "3:6"], "not divisible by M=6"),
    (["--calib-samples", "5000"], "too little calibration text"),
    (["--calib-data", "/nonexistent/calib.txt"], "does not exist"),
    (["--refine", "admm", "--refine-iters", "0"], "refine_iters must be >= 1"),
    (["--layer-sparsity", "blocks:1-4=0.7"], "the model has 2 blocks (0-1)"),
    (["--layer-sparsity", r"mlp\.dwon_proj=0.7"], "matches no linear layer"),
    (["--include", "attention", "--exclude", "q_porj"], "'q_porj' matches no linear layer"),
    (["--include", "gate_proj", "--include", "up_porj"], "'up_porj' matches no linear layer"),
    (["--method", "wanda", "--calib-seqlen", "300"], "calib_seqlen 300 is longer than the model's context (256"),
    (["--eval-seqlen", "257"], "eval seqlen 257 is longer than the model's context (256 positions)"),
    (["--device", "gpu"], "device 'gpu' is not a torch device"),
    (["--device", "cuda:99"], "device 'cuda:99' is not available here"),  # no machine has a hundredth GPU
    (["--method", "wanda", "--percdamp", "0.05"], "percdamp is an option of alps and sparsegpt, not of wanda"),
    (["--method", "magnitude", "--blocksize", "64"], "blocksize is an option of sparsegpt, not of magnitude"),
    (["--method", "sparsegpt", "--refine-iters", "5"], "refine_iters is read only with refine=admm"),
])
def test_bad_input_is_one_line_exit_2_and_no_output(tiny_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    code = main(["prune", *args(tiny_dir, *extra), "--output", str(out)])
    printed = capsys.readouterr()
    err = printed.err.strip()
    assert code == 2
    assert "dense perplexity" not in printed.out  # refused before the dense evaluation, not after it
    assert err.startswith("secateurs: error:") and message in err and len(err.splitlines()) == 1
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_unreadable_model_and_existing_output(tiny_dir, tmp_path, capsys):
    code = main(["prune", "--model", str(tmp_path / "nowhere"), "--quiet", "--output", str(tmp_path / "o")])
    assert code == 2 and "no such file or folder" in capsys.readouterr().err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    code = main(["prune", *args(tiny_dir, "--method", "magnitude"), "--output", str(tmp_path / "busy")])
    assert code == 2 and "not empty" in capsys.readouterr().err
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("command", [["prune", "--method", "magnitude"], ["finetune", "--steps", "1"],
                                     ["iterate", "--method", "magnitude", "--sparsities", "0.2", "--steps-per-cycle", "1"]])
@pytest.mark.parametrize("below", ["", "sub/folder"])
def test_an_output_that_is_or_lies_under_a_file_is_refused(tiny_dir, tmp_path, capsys, command, below):
    (tmp_path / "taken").write_text("mine")
    output = tmp_path / "taken" / below if below else tmp_path / "taken"
    code = main([command[0], "--model", str(tiny_dir / "model"), "--quiet", *command[1:], "--output", str(output)])
    assert code == 2
    assert capsys.readouterr().err.strip() == (f"secateurs: error: output folder {str(output)!r}: "
                                               f"{str(tmp_path / 'taken')!r} is a file")
    assert (tmp_path / "taken").read_text() == "mine"


PRUNE = ["prune", "--method", "magnitude", "--no-eval", "--output", "{tmp}/out"]
COMPARE = ["compare", "--methods", "magnitude", "--sparsities", "0.5"]
UNDER_A_FILE = "'{tmp}/taken/r.json': '{tmp}/taken' is a file, not a folder"


@pytest.mark.parametrize("argv, message", [
    ([*PRUNE, "--report", "{tmp}/taken/r.json"], "--report " + UNDER_A_FILE),
    ([*COMPARE, "--report", "{tmp}/taken/r.json"], "--report " + UNDER_A_FILE),
    (["eval", "--report", "{tmp}/taken/r.json"], "--report " + UNDER_A_FILE),
    ([*COMPARE, "--markdown", "{tmp}/taken/r.json"], "--markdown " + UNDER_A_FILE),
    ([*PRUNE, "--report", "{tmp}"], "--report '{tmp}' is a folder; give a file name"),
    ([*COMPARE, "--markdown", "{tmp}"], "--markdown '{tmp}' is a folder; give a file name"),
])
def test_a_report_path_that_cannot_be_written_is_refused_before_any_work(tiny_dir, tmp_path, capsys, argv, message):
    (tmp_path / "taken").write_text("mine")
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert main([argv[0], "--model", str(tiny_dir / "model"), "--quiet", *argv[1:]]) == 2
    assert capsys.readouterr().err.strip() == "secateurs: error: " + message.format(tmp=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # no model was saved, nothing measured


FULL = "Error while serializing: I/O error: No space left on device (os error 28)"  # as safetensors says it


@pytest.mark.parametrize("error, message", [
    (OSError("disk full"), "disk full"),
    (SafetensorError(FULL), "cannot save the model in '{out}': " + FULL),  # not an OSError: wrapped in one
])
def test_crash_while_saving_is_one_line_and_leaves_no_output(tiny_dir, tmp_path, monkeypatch, capsys, error, message):
    def boom(self, *a, **k):
        raise error

    monkeypatch.setattr(tf.PreTrainedModel, "save_pretrained", boom)
    assert main(["prune", *args(tiny_dir, "--method", "magnitude", "--no-eval", "--no-stream"),
                 "--output", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == f"secateurs: error: {message.format(out=tmp_path / 'o')}\n"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, flag", [
    (["prune", "--method", "magnitude", "--output", "/sys/secateurs-test/out"], "output folder"),
    (["finetune", "--steps", "1", "--output", "/sys/secateurs-test/out"], "output folder"),
    (["iterate", "--method", "magnitude", "--sparsities", "0.2", "--steps-per-cycle", "1",
      "--output", "/sys/secateurs-test/out"], "output folder"),
    (["prune", "--method", "magnitude", "--output", "{tmp}/o", "--report", "/sys/secateurs-test/out"], "--report"),
    (["compare", "--methods", "magnitude", "--sparsities", "0.5", "--markdown", "/sys/secateurs-test/out"],
     "--markdown"),
])
def test_a_place_that_cannot_be_written_is_refused_before_the_model_loads(tmp_path, capsys, unwritable, argv, flag):
    argv = [a.format(tmp=tmp_path) for a in argv]
    # no such model: had the command got as far as loading it, the error would say so instead
    assert main([argv[0], "--model", str(tmp_path / "no-model"), "--quiet", *argv[1:]]) == 2
    assert capsys.readouterr().err == (f"secateurs: error: {flag} '/sys/secateurs-test/out': cannot write in "
                                       f"'/sys' ({unwritable})\n")
    assert list(tmp_path.iterdir()) == []


def test_recipe_with_stages_and_eval_section(tiny_dir, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("method: wanda\nstages:\n  - {include: [attention], sparsity: 0.25}\n"
                      "  - {include: [mlp], method: sparsegpt, pattern: '4:8'}\neval: {windows: 2, seqlen: 16}\n")
    report = tmp_path / "r.json"
    code = main(["prune", "--model", str(tiny_dir / "model"), "--quiet", "--calib-data", str(tiny_dir / "train.txt"),
                 "--calib-samples", "4", "--calib-seqlen", "32", "--eval-data", str(tiny_dir / "test.txt"),
                 "--recipe", str(recipe), "--output", str(tmp_path / "o"), "--report", str(report)])
    assert code == 0
    r = json.loads(report.read_text())
    assert [c["method"] for c in r["config"]] == ["wanda", "sparsegpt"]
    assert r["eval"]["windows"] == 2 and r["eval"]["seqlen"] == 16 and r["eval"]["data"].endswith("test.txt")
    attn = {v for k, v in r["per_layer"].items() if "self_attn" in k}
    mlp = {v for k, v in r["per_layer"].items() if ".mlp." in k}
    assert attn == {0.25} and mlp == {0.5}
    saved = (tmp_path / "o" / "secateurs_recipe.yaml").read_text()
    assert "stages:" in saved and "4:8" in saved


def test_model_without_blocks_is_refused(tiny_dir, tmp_path, capsys):
    folder = tmp_path / "flat"
    config = tf.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=0,
                            num_attention_heads=4, num_key_value_heads=2)
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tf.AutoTokenizer.from_pretrained(tiny_dir / "model").save_pretrained(folder)
    code = main(["prune", *args(tiny_dir, "--method", "magnitude", "--no-eval"), "--model", str(folder),
                 "--output", str(tmp_path / "o")])
    assert code == 2 and "no repeated blocks" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("value, message", [
    (3e38, "layers.0.mlp.down_proj: its calibration inputs hold inf or NaN"),  # finite weights, overflowing inputs
    (float("inf"), "model.layers.0.mlp.up_proj: 64 of its 8192 weights are inf or NaN (a broken checkpoint?)"),
])
def test_non_finite_weights_or_activations_are_refused_with_the_layer_named(tiny_dir, tmp_path, capsys, value,
                                                                              message):
    import torch

    folder = tmp_path / "overflowing"
    model = tf.AutoModelForCausalLM.from_pretrained(tiny_dir / "model")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0] = value
    model.save_pretrained(folder)
    tf.AutoTokenizer.from_pretrained(tiny_dir / "model").save_pretrained(folder)
    capsys.readouterr()  # the loading above wrote progress bars
    code = main(["prune", *args(tiny_dir, "--method", "wanda", "--no-eval"), "--model", str(folder),
                 "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert message in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("grid, message", [
    (["--methods", "wanda,wanda+obs"], "refine must be one of"),
    (["--methods", "magnitude,wanda,magnitude"], "methods name 'magnitude' more than once"),
    (["--sparsities", "0.5,2:4,2:4"], "sparsities name '2:4' more than once"),
    (["--methods", ","], "methods: name at least one"),
    (["--methods", "magnitude,wanda", "--percdamp", "0.05"], "percdamp: read by none of the compared methods (magnitude, wanda)"),
    (["--methods", "wanda,sparsegpt", "--refine-damp", "0.2"], "refine_damp: read by none of the compared methods"),
])
def test_compare_refuses_a_bad_grid_before_loading(tiny_dir, capsys, grid, message):
    code = main(["compare", "--model", str(tiny_dir / "missing-model"), *grid, "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("extra, message", [
    (["--refine", "obs"], "argument --refine: invalid choice: 'obs'"),
    (["--sparsity", "abc"], "argument --sparsity: invalid float value: 'abc'"),
    (["--threads", "0"], "argument --threads: must be >= 1, got 0"),
    (["--threads", "two"], "argument --threads: invalid int value: 'two'"),
])
def test_argument_errors_are_one_line_too(tiny_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(["prune", *args(tiny_dir, *extra), "--output", str(out)])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2
    assert err.startswith("secateurs: error:") and message in err and len(err.splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("argv, expected", [
    (["prune", "--quiet"], "secateurs: error: prune: the following arguments are required: --output"),
    (["compare", "--bogus", "1"], "secateurs: error: unrecognized arguments: --bogus 1"),  # the top parser's
])
def test_argument_errors_name_the_command_once(capsys, argv, expected):
    with pytest.raises(SystemExit):
        main(argv)
    assert capsys.readouterr().err.strip() == expected


def test_hub_id_loads_through_from_pretrained_from_the_local_hub_cache(tiny_dir, tmp_path):
    """A hub id takes the real ``from_pretrained`` path; offline it resolves from the HF cache, laid out here by
    hand as the hub client writes it (``models--org--name/snapshots/<rev>`` + ``refs/main``)."""
    import os
    import shutil
    import subprocess
    import sys

    repo = tmp_path / "hub" / "models--tiny-org--tiny-llama"
    revision = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_dir / "model", repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1")

    def command(model: str, report):
        return ["eval", "--model", model, "--quiet", "--data", str(tiny_dir / "test.txt"), "--eval-seqlen", "32",
                "--eval-windows", "2", "--report", str(report)]

    def eval_report(model: str, name: str):  # in a fresh process: the hub client reads its settings on import
        report = tmp_path / f"{name}.json"
        code = f"from secateurs.cli import main; raise SystemExit(main({command(model, report)!r}))"
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        return done, (json.loads(report.read_text()) if report.exists() else None)

    done, by_id = eval_report("tiny-org/tiny-llama", "hub")
    assert done.returncode == 0, done.stderr
    assert main(command(str(tiny_dir / "model"), tmp_path / "folder.json")) == 0
    assert by_id["perplexity"] == json.loads((tmp_path / "folder.json").read_text())["perplexity"] > 1
    done, _ = eval_report("tiny-org/not-cached", "missing")
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert done.stderr.startswith("secateurs: error: cannot load model 'tiny-org/not-cached'")


@pytest.mark.parametrize("argv, saved", [
    (["prune", "--method", "wanda", "--calib-data", "{tiny}/train.txt", "--calib-samples", "4", "--calib-seqlen", "32",
      "--eval-data", "{tiny}/test.txt", "--eval-seqlen", "32", "--eval-windows", "3"], "out"),
    (["finetune", "--steps", "1", "--data", "{tiny}/train.txt"], "out"),
    (["iterate", "--method", "magnitude", "--sparsities", "0.2", "--steps-per-cycle", "1"], "out/cycle-001"),
])
def test_a_disk_without_room_for_the_model_is_refused_before_any_work(tiny_dir, tmp_path, capsys, free_space, argv,
                                                                      saved):
    free_space(2**20)  # 1 MiB free
    model = tf.AutoModelForCausalLM.from_pretrained(tiny_dir / "model")
    weights = sum(p.numel() * p.element_size() for p in model.parameters())  # tied weights once
    capsys.readouterr()  # transformers' loading bar
    out, argv = tmp_path / "out", [a.format(tiny=tiny_dir) for a in argv]
    code = main([argv[0], "--model", str(tiny_dir / "model"), "--quiet", *argv[1:], "--output", str(out)])
    printed = capsys.readouterr()
    assert code == 2 and "perplexity" not in printed.out and "training" not in printed.out
    needed = (weights + 16 * 2**20) / 2**20
    assert printed.err == (f"secateurs: error: output folder '{tmp_path / saved}': saving the model needs "
                           f"{needed:,.0f} MiB, and '{tmp_path}' has 1 MiB free\n")
    assert not out.exists()


def test_finetune_with_checkpoints_checks_room_for_two_states_up_front(tiny_dir, tmp_path, capsys, free_space):
    from secateurs.models.snapshot import weight_bytes
    from secateurs.training import TrainConfig, training_state_bytes

    model = tf.AutoModelForCausalLM.from_pretrained(tiny_dir / "model")
    weights = weight_bytes(model)
    state = training_state_bytes(model, TrainConfig(steps=3, seqlen=32))
    free = weights + 16 * 2**20 + state  # room for the model and one state, not for two
    free_space(free)
    capsys.readouterr()
    flags = ["--model", str(tiny_dir / "model"), "--quiet", "--data", str(tiny_dir / "train.txt"), "--steps", "3",
             "--train-seqlen", "32", "--eval-data", str(tiny_dir / "test.txt"), "--eval-seqlen", "32",
             "--eval-windows", "2"]
    out = tmp_path / "out"
    assert main(["finetune", *flags, "--save-every", "1", "--output", str(out)]) == 2  # two checkpoints
    err = capsys.readouterr().err
    needed = (2 * state + 16 * 2**20) / 2**20
    assert err == (f"secateurs: error: output folder '{out}': saving the model and the training state "
                   f"(--save-every 1: 2 checkpoint(s) of ~{state / 2**20:,.0f} MiB) needs {needed:,.0f} MiB, and "
                   f"'{tmp_path}' has {free / 2**20:,.0f} MiB free\n")
    assert not out.exists() and not list(tmp_path.iterdir())
    assert main(["finetune", *flags, "--save-every", "2", "--output", str(out)]) == 0  # one: it fits
    assert (out / "config.json").exists()


def test_training_room_counts_the_peak_of_checkpoints_and_a_state_already_on_disk(tiny_dir, tmp_path):
    from secateurs.training.state import training_room as _training_room
    from secateurs.models.snapshot import weight_bytes
    from secateurs.training import TrainConfig, training_state_bytes

    model = tf.AutoModelForCausalLM.from_pretrained(tiny_dir / "model")
    config = TrainConfig(steps=5)
    state, weights, file = training_state_bytes(model, config), weight_bytes(model), tmp_path / "o.train-state.pt"
    assert state > 3 * weights  # weights, two AdamW moments, masks
    room = {every: _training_room(model, config, every, file)[0] for every in (0, 2, 4, 5)}
    assert room == {0: 0, 2: 2 * state - weights, 4: state, 5: 0}  # checkpoints after steps 2 and 4; 4; none
    file.write_bytes(b"x" * state)  # a resumed run's state: its room is taken already
    assert _training_room(model, config, 2, file)[0] == state - weights


def test_iterate_checks_room_for_every_cycle_still_to_run(tiny_dir, tmp_path, capsys, free_space):
    from secateurs.models.snapshot import weight_bytes

    weights = weight_bytes(tf.AutoModelForCausalLM.from_pretrained(tiny_dir / "model"))
    out = tmp_path / "out"
    flags = ["iterate", "--model", str(tiny_dir / "model"), "--quiet", "--method", "magnitude", "--steps-per-cycle",
             "1", "--train-data", str(tiny_dir / "train.txt"), "--train-seqlen", "32", "--eval-data",
             str(tiny_dir / "test.txt"), "--eval-seqlen", "32", "--eval-windows", "2", "--output", str(out)]
    assert main([*flags, "--sparsities", "0.2"]) == 0  # cycle 1 done, with room to spare
    free = 2 * (weights + 16 * 2**20) - 1  # room for one more cycle's model, not two
    free_space(free)
    capsys.readouterr()
    assert main([*flags, "--sparsities", "0.2,0.4,0.6"]) == 2
    needed = 2 * (weights + 16 * 2**20) / 2**20
    assert capsys.readouterr().err == (f"secateurs: error: output folder '{out / 'cycle-002'}': saving the model "
                                       f"of 2 cycle(s) needs {needed:,.0f} MiB, and '{out}' has "
                                       f"{free / 2**20:,.0f} MiB free\n")
    assert sorted(p.name for p in out.iterdir()) == ["cycle-001", "history.json"]
    assert main([*flags, "--sparsities", "0.2,0.4"]) == 0  # one cycle left: it fits
    assert (out / "cycle-002" / "config.json").exists()


@pytest.mark.parametrize("how", ["streamed", "--no-stream"])
def test_an_interrupted_prune_resumes_its_walk_and_ends_identical(tiny_dir, tmp_path, capsys, monkeypatch, how):
    from secateurs.engine import WalkCheckpoint

    whole, part, state = tmp_path / "whole", tmp_path / "part", tmp_path / "part.prune-state"
    flags = args(tiny_dir, "--method", "sparsegpt", "--no-eval", *([how] if how != "streamed" else []))
    assert main(["prune", "--no-stream", *flags, "--output", str(whole)]) == 0  # in memory, uninterrupted
    real_save = WalkCheckpoint.save

    def save_then_die(self, block, *rest):  # Ctrl-C right after the state after block 0 reached the disk
        real_save(self, block, *rest)
        raise KeyboardInterrupt

    monkeypatch.setattr(WalkCheckpoint, "save", save_then_die)
    assert main(["prune", *flags, "--save-every", "1", "--output", str(part)]) == 130
    assert capsys.readouterr().err == (f"secateurs: interrupted; the walk's state after block 0 is in {state}; the "
                                       "same command resumes from it\n")
    assert not part.exists() and WalkCheckpoint(state).saved_block == 0
    # a streamed walk keeps the finished block as the output's first shard, no block-NNN copy
    assert sorted(p.name for p in state.iterdir() if "safetensors" in p.name) == (
        ["hidden-000.safetensors", "model-00001-of-00003.safetensors"]
        if how == "streamed" else ["block-000.safetensors", "hidden-000.safetensors"])
    monkeypatch.undo()

    changed = [*flags, "--percdamp", "0.02"]
    assert main(["prune", *changed, "--save-every", "1", "--output", str(part)]) == 2
    assert "holds the walk of another run (config differ)" in capsys.readouterr().err and state.exists()
    if how == "streamed":  # a streamed walk's blocks are in the output's shards: an in-memory walk cannot use them
        assert main(["prune", *flags, "--no-stream", "--save-every", "1", "--output", str(part)]) == 2
        assert "holds the walk of another run (streamed differ)" in capsys.readouterr().err and state.exists()
    assert main(["prune", *args(tiny_dir, "--method", "magnitude"), "--output", str(part)]) == 2
    assert "holds a saved walk, which this run cannot resume (method magnitude does not walk the blocks" in (
        capsys.readouterr().err)

    report = tmp_path / "part.json"
    assert main(["prune", *flags, "--save-every", "1", "--output", str(part), "--report", str(report)]) == 0
    assert json.loads(report.read_text())["resumed_at_block"] == 1 and not state.exists()
    a = tf.AutoModelForCausalLM.from_pretrained(whole).state_dict()
    b = tf.AutoModelForCausalLM.from_pretrained(part).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_prune_save_every_needs_a_walk_and_no_resume_starts_over(tiny_dir, tmp_path, capsys):
    out, state = tmp_path / "out", tmp_path / "out.prune-state"
    assert main(["prune", *args(tiny_dir, "--method", "magnitude"), "--save-every", "1", "--output", str(out)]) == 2
    assert "method magnitude does not walk the blocks with calibration data" in capsys.readouterr().err
    state.mkdir()
    (state / "walk.json").write_text("{}")
    assert main(["prune", *args(tiny_dir, "--no-eval"), "--output", str(out)]) == 2
    assert capsys.readouterr().err == (f"secateurs: error: {state / 'walk.json'} is not a walk state (it lacks hidden, "
                                       f"identity, next_block, records, seconds); remove {state} (with the CLI: "
                                       "--no-resume) to start over\n")
    report = tmp_path / "r.json"  # --no-resume removes it unread
    assert main(["prune", *args(tiny_dir, "--no-eval"), "--no-resume", "--output", str(out), "--report",
                 str(report)]) == 0
    assert not state.exists() and "resumed_at_block" not in json.loads(report.read_text())


@pytest.mark.parametrize("streamed", [True, False])
def test_prune_save_every_checks_room_for_the_walk_state(tiny_dir, tmp_path, capsys, free_space, streamed):
    from secateurs.models.snapshot import weight_bytes

    weights = weight_bytes(tf.AutoModelForCausalLM.from_pretrained(tiny_dir / "model"))
    outputs = 2 * 4 * 32 * 64 * 4  # two copies of 4 x 32 outputs of 64
    walk = outputs if streamed else weights + outputs  # in memory: every block's weights too (<= the model's)
    free_space(weights + 16 * 2**20 + walk - 1)
    capsys.readouterr()
    out = tmp_path / "out"
    flags = [*args(tiny_dir, "--no-eval"), *([] if streamed else ["--no-stream"]), "--save-every", "1"]
    assert main(["prune", *flags, "--output", str(out)]) == 2
    assert capsys.readouterr().err.startswith(f"secateurs: error: output folder '{out}': saving the model and the "
                                              "walk's state (--save-every 1) needs ")
    free_space(weights + 16 * 2**20 + walk)
    assert main(["prune", *flags, "--output", str(out)]) == 0


@pytest.mark.parametrize("recipe, message", [
    ("method: wanda\ninclude: 5\n", "include must be a list of str, got int 5"),
    ("method: wanda\ninclude: mlp\n", "include must be a list of str, got str 'mlp'"),  # not split into letters
    ("method: wanda\nexclude: [5]\n", "exclude must be a list of str, got list [5]"),
    ("method: wanda\nbatch_size: ten\n", "batch_size must be int, got str 'ten'"),
    ("method: wanda\nbatch_size: 2.5\n", "batch_size must be int, got float 2.5"),
    ("method: wanda\nbatch_size: true\n", "batch_size must be int, got bool True"),
    ("method: wanda\neval: {windows: x}\n", "windows must be int or null, got str 'x'"),
    ("method: sparsegpt\npercdamp: high\n", "sparsegpt option percdamp must be float, got str 'high'"),
    ("method: channels\nratio: '0.2'\n", "ratio must be float or null, got str '0.2'"),
])
def test_a_recipe_value_of_the_wrong_type_is_one_line(tiny_dir, tmp_path, capsys, recipe, message):
    path = tmp_path / "r.yaml"
    path.write_text(recipe)
    code = main(["prune", *args(tiny_dir), "--recipe", str(path), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == f"secateurs: error: {message}" and not (tmp_path / "out").exists()


@pytest.mark.parametrize("line, message", [('{"text": 5}', "row 2's 'text' is int 5, not a string"),
                                           ('{"text": null}', "row 2's 'text' is NoneType null, not a string")])
def test_a_jsonl_row_that_is_not_text_is_one_line(tiny_dir, tmp_path, capsys, line, message):
    data = tmp_path / "calib.jsonl"
    data.write_text('{"text": "a real line of text"}\n' + line + "\n")
    code = main(["prune", *args(tiny_dir, "--calib-data", str(data)), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("secateurs: error:") and message in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("extra, message", [
    (["--method", "blocks", "--remove-blocks", "2"], "cannot remove 2 of the model's 2 blocks"),
    (["--method", "heads", "--remove-per-layer", "2"], "removing 2 of 2 head units (per-group) per block"),
    (["--method", "channels", "--remove-per-layer", "128"], "removing 128 of 128 channels per block"),
])
def test_an_impossible_structured_count_is_refused_before_the_dense_evaluation(tiny_dir, tmp_path, capsys, extra,
                                                                                message):
    code = main(["prune", *args(tiny_dir, *extra), "--output", str(tmp_path / "out")])
    printed = capsys.readouterr()
    assert code == 2 and "dense perplexity" not in printed.out and message in printed.err


def test_a_bug_is_not_dressed_as_a_usage_error(tiny_dir, tmp_path, monkeypatch):
    """A ValueError from inside secateurs is a bug: it keeps its traceback instead of becoming exit 2."""
    import secateurs.api

    def broken(*a, **k):
        raise ValueError("a bug")

    monkeypatch.setattr(secateurs.api, "prune", broken)
    with pytest.raises(ValueError, match="a bug"):
        main(["prune", *args(tiny_dir, "--no-stream"), "--output", str(tmp_path / "out")])


@pytest.mark.parametrize("flags", [[], ["--no-stream"]])
def test_a_task_model_is_refused_rather_than_loaded_without_its_head(tmp_path, capsys, flags):

    from secateurs.errors import ModelLoadError
    from secateurs.models import load_model
    from secateurs.models.arch import model_class

    config = tf.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=64, num_labels=3)
    tf.BertForTokenClassification(config).save_pretrained(tmp_path / "clf")  # a head secateurs does not keep
    capsys.readouterr()
    out = tmp_path / "out"
    assert main(["prune", "--model", str(tmp_path / "clf"), "--method", "magnitude", "--no-eval", "--quiet",
                 "--output", str(out), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert "a BertForTokenClassification checkpoint" in err and "drop its" in err and len(err.splitlines()) == 1
    assert not out.exists()
    with pytest.raises(ModelLoadError, match="BertForTokenClassification"):
        load_model(str(tmp_path / "clf"))
    causal = "AutoModelForCausalLM"
    assert model_class(tf.BertConfig(architectures=["BertLMHeadModel"]), "lm").__name__ == causal  # a causal LM
    assert model_class(tf.BertConfig(), "unnamed").__name__ == causal  # a config that names no class: built as one
