"""Sweeps (secateurs sweep / sensitivity): grid checks, cells from the dense weights, resume, tables, report."""

import csv
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import cli_args
from secateurs import EvalConfig, PruneConfig, api, load_model
from secateurs.cli import main
from secateurs.errors import ConfigError
from secateurs.sweep import Grid, block_linears

TINY_BASE = {"calib_samples": 4, "calib_seqlen": 32}


def tiny_grid(tiny_dir, experiments, **extra):
    return {"base": {**TINY_BASE, "calib_data": str(tiny_dir / "train.txt")},
            "eval": {"data": str(tiny_dir / "test.txt"), "seqlen": 32, "windows": 3},
            "train": {"data": str(tiny_dir / "train.txt"), "batch_size": 2, "seqlen": 32, "lr": 1.0e-3},
            "experiments": experiments, **extra}


def write_grid(path, grid):
    path.write_text(json.dumps(grid))
    return path


def run_sweep(tiny_dir, grid_file, out, *extra, capsys=None):
    code = main(["sweep", str(grid_file), "--output", str(out), "--model", str(tiny_dir / "model"), "--quiet",
                 *extra])
    return code


# ------------------------------------------------------------------------------------------- the grid


def test_experiment_is_the_product_of_its_axes_and_shared_cells_run_once():
    grid = Grid.from_dict({"experiments": {
        "sparsity": {"method": "wanda", "sparsity": [0.3, 0.5]},
        "methods": {"method": ["magnitude", "wanda"], "sparsity": 0.5},
        "scopes": {"method": "wanda", "sparsity": 0.5, "include": ["all", "attention"]},
        "recovery": {"method": "wanda", "sparsity": 0.5, "finetune_steps": [0, 5]}}})
    cells = grid.cells()
    assert [c.describe() for c in cells] == [
        "method=wanda sparsity=0.3", "method=wanda sparsity=0.5", "method=magnitude sparsity=0.5",
        "method=wanda sparsity=0.5 include=attention", "method=wanda sparsity=0.5 finetune_steps=5"]
    # include=all is the default scope and finetune_steps 0 no fine-tuning: the plain cell, run once
    assert cells[1].experiments == ("sparsity", "methods", "scopes", "recovery")
    assert cells[3].config.include == ("attention",)


def test_a_list_of_lists_is_an_axis_of_several_scopes():
    grid = Grid.from_dict({"experiments": {"x": {"include": [["attention", "mlp"], ["mlp"]]}}})
    assert [c.config.include for c in grid.cells()] == [("attention", "mlp"), ("mlp",)]


def test_every_problem_of_a_grid_is_listed_at_once():
    with pytest.raises(ConfigError) as err:
        Grid.from_dict({"base": {"calib_samples": "many"}, "eval": {"windws": 3}, "experiments": {
            "a": {"method": "wanda", "sparsity": [], "colour": "red"},
            "b": {"method": "wanda", "pattern": "2:4", "sparsity": [0.3, 0.5]},
            "c": {"method": ["wanda", "nosuch"], "finetune_steps": -1}}})
    text = str(err.value)
    assert "experiments.b" not in text  # every cell would repeat the base's problem
    for part in ("5 problem(s)", "eval: unknown field(s) windws", "experiments.a: unknown field(s) colour",
                 "experiments.a.sparsity: empty axis", "experiments.c.finetune_steps: -1",
                 "base: calib_samples must be int, got str 'many'"):
        assert part in text, part


def test_combinations_no_config_accepts_are_listed_before_any_cell():
    with pytest.raises(ConfigError) as err:
        Grid.from_dict({"experiments": {"b": {"method": "wanda", "pattern": "2:4", "sparsity": [0.3, 0.5]},
                                        "c": {"method": ["wanda", "nosuch"]}}})
    text = str(err.value)
    assert "2 problem(s)" in text  # 2:4 at 0.5 is consistent
    assert "experiments.b: method=wanda pattern=2:4 sparsity=0.3: sparsity 0.3 contradicts pattern 2:4" in text
    assert "experiments.c: method=nosuch: method: unknown 'nosuch'" in text


@pytest.mark.parametrize("data, message", [
    ({}, "experiments: name at least one"),
    ({"experiments": {"a": {}}}, "experiments.a must be a mapping of config fields"),
    ({"experiments": {"a": {"sensitivity": "head"}}}, "sensitivity must be one of block, role"),
    ({"experiments": {"a": {"sensitivity": "block", "include": "mlp"}}}, "include does not apply"),
    ({"experiments": {"a": {"method": "wanda"}}, "train": {"steps": 5}}, "steps: each cell's finetune_steps"),
    ({"experiments": {"a": {"method": "wanda"}}, "train": {"lr": "1e-4"}}, "lr must be float, got str"),
    ({"experiments": {"a": {"method": "wanda"}}, "zero_shot": {"tasks": ["x"], "limit": 0}}, "limit must be"),
    ({"experiments": {"a": {"method": "wanda"}}, "base": {"sparsity": [0.5]}}, "axes belong in an experiment"),
    ({"experiments": {"a": {"method": "wanda"}}, "grid": {}}, "unknown section(s) grid"),
])
def test_bad_grids_are_refused_in_words(data, message):
    with pytest.raises(ConfigError, match=None) as err:
        Grid.from_dict(data)
    assert message in str(err.value)


def test_grid_file_errors_name_the_file(tmp_path):
    path = write_grid(tmp_path / "g.json", {"experiments": {"a": {"sparsity": []}}})
    with pytest.raises(ConfigError, match="g.json: the grid has 1 problem"):
        Grid.load(path)
    assert main(["sweep", str(path), "--output", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------- running


@pytest.fixture(scope="module")
def swept(tiny_dir, tmp_path_factory):
    """One sweep over the four classic experiments, a structured cell and a sensitivity experiment."""
    root = tmp_path_factory.mktemp("sweep")
    grid = tiny_grid(tiny_dir, {
        "sparsity": {"method": ["magnitude", "wanda"], "sparsity": [0.3, 0.6]},
        "scopes": {"method": "wanda", "sparsity": 0.6, "include": ["all", "attention", "mlp"]},
        "recovery": {"method": "wanda", "sparsity": 0.6, "finetune_steps": [0, 3]},
        "structured": {"method": "channels", "ratio": [0.25, 0.5], "score": "magnitude"},
        "roles": {"method": "wanda", "sparsity": 0.6, "sensitivity": "role"}})
    grid["train"]["eval_every"] = 1
    path = write_grid(root / "grid.json", grid)
    assert run_sweep(tiny_dir, path, root / "out") == 0
    return root, json.loads((root / "out" / "results.json").read_text())


def test_sweep_writes_every_cell_its_table_and_report(swept):
    root, results = swept
    out = root / "out"
    # include=all is the plain Wanda 0.6 cell; the roles experiment is 2 blocks x 2 roles
    assert results["complete"] and len(results["cells"]) == 4 + 2 + 1 + 2 + 4
    with open(out / "results.csv") as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == 1 + len(results["cells"]) and table[0]["method"] == "dense"
    for column in ("experiment", "method", "sparsity", "include", "calib_samples", "perplexity", "params",
                   "weight_bytes", "prune_seconds", "peak_rss_bytes", "finetune_steps", "prefill_speedup"):
        assert column in table[0], column
    assert {p.name for p in (out / "plots").iterdir()} == {
        "perplexity-vs-sparsity.png", "layer-sparsity.png", "sensitivity.png", "recovery.png", "pareto.png"}
    page = (out / "report.html").read_text()
    assert page.count("<img ") == 5 and "http" not in page.replace("http-equiv", "")  # nothing fetched
    for name in results["grid"]["experiments"]:
        assert f"<h2>{name}</h2>" in page


def test_each_cell_equals_its_own_prune_from_the_dense_model(swept, tiny_dir):
    _, results = swept
    rows = {json.dumps(r["fields"], sort_keys=True): r for r in results["cells"]}
    model, tok = load_model(str(tiny_dir / "model"))
    eval_config = EvalConfig(data=str(tiny_dir / "test.txt"), seqlen=32, windows=3)
    assert api.evaluate(model, tok, eval_config, progress=False) == pytest.approx(results["dense"]["perplexity"],
                                                                                  rel=1e-6)
    for fields in ({"method": "wanda", "sparsity": 0.6, "include": ["mlp"]}, {"method": "magnitude", "sparsity": 0.3}):
        model, tok = load_model(str(tiny_dir / "model"))
        cfg = PruneConfig.from_dict({**TINY_BASE, "calib_data": str(tiny_dir / "train.txt"), **fields})
        result = api.prune(model, cfg, api.calibration_data(tok, cfg), progress=False)
        row = rows[json.dumps(fields, sort_keys=True)]
        assert row["sparsity"] == pytest.approx(result.sparsity)
        assert row["perplexity"] == pytest.approx(api.evaluate(model, tok, eval_config, progress=False), rel=1e-6)


def test_sensitivity_cells_prune_one_role_of_one_block(swept, tiny_dir):
    _, results = swept
    model, _ = load_model(str(tiny_dir / "model"))
    linears = block_linears(model)
    cells = [r for r in results["cells"] if "block" in r["fields"]]
    assert sorted((r["fields"]["block"], r["fields"]["role"]) for r in cells) == [
        (0, "attention"), (0, "mlp"), (1, "attention"), (1, "mlp")]
    for r in cells:
        want = {n for n, role in linears[r["fields"]["block"]].items() if role == r["fields"]["role"]}
        assert set(r["per_layer"]) == want and all(v == pytest.approx(0.6, abs=0.02) for v in r["per_layer"].values())


def test_fine_tuned_cell_records_its_recovery_and_structured_cells_their_speed(swept):
    _, results = swept
    tuned = next(r for r in results["cells"] if r["fields"].get("finetune_steps") == 3)
    assert [e["step"] for e in tuned["recovery"]] == [0, 1, 2, 3]
    plain = next(r for r in results["cells"] if r["fields"] == {"method": "wanda", "sparsity": 0.6})
    assert tuned["perplexity_pruned"] == pytest.approx(plain["perplexity"], rel=1e-6)  # fine-tuned from that cell
    assert tuned["perplexity"] == tuned["recovery"][-1]["perplexity"]
    assert tuned["sparsity"] == pytest.approx(plain["sparsity"])
    cut = [r for r in results["cells"] if r["config"]["method"] == "channels"]
    assert all("speed" in r and r["params"] < results["dense"]["params"] for r in cut)
    assert "speed" in results["dense"]


def test_interrupted_sweep_resumes_to_the_same_table(swept, tiny_dir, monkeypatch, capsys):
    root, results = swept
    from secateurs import sweep as sweep_module

    real, calls = sweep_module.run_cell, []

    def stop_at_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(sweep_module, "run_cell", stop_at_third)
    out = root / "again"
    code = run_sweep(tiny_dir, root / "grid.json", out)
    assert code == 130
    assert "the same command runs the rest" in capsys.readouterr().err
    assert len(json.loads((out / "results.json").read_text())["cells"]) == 2
    monkeypatch.setattr(sweep_module, "run_cell", real)
    assert run_sweep(tiny_dir, root / "grid.json", out) == 0
    assert "13 cells: 2 done, 11 to run" in capsys.readouterr().out
    resumed = json.loads((out / "results.json").read_text())
    pick = lambda r: [(c["key"], c["perplexity"], c["sparsity"]) for c in r["cells"]]  # noqa: E731
    assert [k for k, _, _ in pick(resumed)] == [k for k, _, _ in pick(results)]
    for (_, p1, s1), (_, p2, s2) in zip(pick(resumed), pick(results)):
        assert p1 == pytest.approx(p2, rel=1e-5) and s1 == pytest.approx(s2)


def test_a_finished_sweep_runs_nothing_and_new_cells_only(swept, tiny_dir, tmp_path, capsys):
    root, results = swept
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    grid = json.loads((root / "grid.json").read_text())
    grid["experiments"]["more"] = {"method": "wanda", "sparsity": [0.3, 0.45]}
    path = write_grid(tmp_path / "grid.json", grid)
    assert run_sweep(tiny_dir, path, out) == 0
    assert "14 cells: 13 done, 1 to run" in capsys.readouterr().out
    cells = json.loads((out / "results.json").read_text())["cells"]
    assert next(c for c in cells if c["fields"] == {"method": "wanda", "sparsity": 0.3})["experiments"] == [
        "sparsity", "more"]


def test_a_sweep_with_other_shared_settings_is_not_mixed_in(swept, tiny_dir, tmp_path, capsys):
    root, _ = swept
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    grid = json.loads((root / "grid.json").read_text())
    grid["eval"]["windows"] = 2
    assert run_sweep(tiny_dir, write_grid(tmp_path / "grid.json", grid), out) == 2
    assert "holds a sweep made with other shared settings (eval)" in capsys.readouterr().err


def test_cells_that_cannot_run_on_the_model_are_listed_before_the_first(tiny_dir, tmp_path, capsys):
    grid = tiny_grid(tiny_dir, {"a": {"method": "wanda", "include": ["nosuchlayer", "mlp"]},
                                "b": {"method": "wanda", "pattern": "block:48"}})
    assert run_sweep(tiny_dir, write_grid(tmp_path / "g.json", grid), tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "2 cell(s) cannot run on this model" in err and "nosuchlayer" in err and "block:48" in err
    assert not (tmp_path / "out").exists()


def test_report_folder_that_cannot_be_written_is_refused(tiny_dir, tmp_path, unwritable, capsys):
    grid = write_grid(tmp_path / "g.json", tiny_grid(tiny_dir, {"a": {"method": "magnitude"}}))
    assert run_sweep(tiny_dir, grid, Path("/sys/secateurs-sweep")) == 2
    assert "the sweep's folder '/sys/secateurs-sweep': cannot write in '/sys'" in capsys.readouterr().err


def test_sensitivity_command_prints_blocks_most_sensitive_first(tiny_dir, tmp_path, capsys):
    out = tmp_path / "sens"
    assert main(["sensitivity", *cli_args(tiny_dir), "--method", "magnitude", "--sparsity", "0.7",
                 "--output", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    head = next(k for k, line in enumerate(lines) if line.lstrip().startswith("block"))
    table = [line.split() for line in lines[head + 1:head + 3]]
    assert sorted(int(r[0]) for r in table) == [0, 1] and float(table[0][2]) >= float(table[1][2])
    assert (out / "plots" / "sensitivity.png").exists()
    assert main(["sensitivity", *cli_args(tiny_dir), "--include", "mlp", "--output", str(out)]) == 2


# ------------------------------------------------------------------------------------------- the page


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(_chromium() is None, reason="no headless Chromium here (Debian: apt-get install chromium)")
def test_report_shows_its_plots_in_a_real_browser(swept, tmp_path):
    from PIL import Image

    root, _ = swept
    page = (root / "out" / "report.html").resolve()
    browser = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
               f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*browser, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert 'data-plots-shown="5"' in dom  # every figure decoded and drawn by the browser
    shot = tmp_path / "shot.png"
    subprocess.run([*browser, f"--screenshot={shot}", "--window-size=1200,4000", page.as_uri()],
                   capture_output=True, timeout=120)
    pixels = Image.open(shot).convert("L").getdata()
    assert sum(p < 200 for p in pixels) > 20_000  # text, tables and plots, not a blank page
