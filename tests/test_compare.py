"""Every compare cell is the run ``prune`` makes of the same settings: same weights, same perplexity."""

import pytest
import torch

import secateurs.api as api
from secateurs import METHODS, EvalConfig, PruneConfig, compare, evaluate, load_model, prune
from secateurs.api import calibration_data


@pytest.mark.parametrize("method", [*sorted(METHODS), "sparsegpt+admm"])
def test_a_compare_cell_equals_prune(tiny_dir, monkeypatch, method):
    eval_config = EvalConfig(data=str(tiny_dir / "test.txt"), seqlen=32, windows=2)
    shared = {"calib_data": str(tiny_dir / "train.txt"), "calib_samples": 4, "calib_seqlen": 32, "batch_size": 2}
    model, tok = load_model(str(tiny_dir / "model"))
    pruned_weights = {}
    real_prune = api.prune

    def keep_weights(model, cfg, *a, **k):  # the cell's weights, before compare restores the dense ones
        result = real_prune(model, cfg, *a, **k)
        pruned_weights[cfg.pattern] = {n: t.clone() for n, t in model.state_dict().items()}
        return result

    monkeypatch.setattr(api, "prune", keep_weights)
    table = compare(model, tok, [method], ["0.5", "2:4"], shared, eval_config, progress=False)
    for row in table["rows"]:
        name, _, refine = method.partition("+")
        config = PruneConfig.from_dict({**shared, "method": name, **({"refine": refine} if refine else {}),
                                        **api.parse_setting(row["setting"])})
        alone, tok = load_model(str(tiny_dir / "model"))
        prune(alone, config, calibration_data(tok, config), progress=False)
        assert row["perplexity"] == evaluate(alone, tok, eval_config, progress=False)
        cell = pruned_weights[config.pattern]
        assert all(torch.equal(cell[n], t) for n, t in alone.state_dict().items())


def test_compare_runs_sparsegpt_true_sequential_as_prune_does():
    """The bug this guards: a Wanda base config's true_sequential=False reached the SparseGPT cells."""
    cells = api.compare_grid(["wanda", "sparsegpt"], ["0.5"], PruneConfig(calib_samples=4))
    assert [c.resolved.true_sequential for _, _, c in cells] == [False, True]
    assert cells[1][2] == PruneConfig(method="sparsegpt", sparsity=0.5, calib_samples=4)


def test_a_streamed_compare_gives_the_in_memory_table_and_refuses_what_it_cannot_stream(tiny_dir, tmp_path):
    eval_config = EvalConfig(data=str(tiny_dir / "test.txt"), seqlen=32, windows=2)
    shared = {"calib_data": str(tiny_dir / "train.txt"), "calib_samples": 4, "calib_seqlen": 32, "batch_size": 2}
    folder = tiny_dir / "model"
    model, tok = load_model(str(folder))
    grid = (["sparsegpt", "wanda+admm"], ["0.5", "2:4"])
    in_memory = compare(model, tok, *grid, shared, eval_config, progress=False)
    streamed = compare(folder, tok, *grid, shared, eval_config, progress=False, workdir=tmp_path)
    assert (streamed["streamed"], in_memory["streamed"]) == (True, False)
    assert streamed["dense_perplexity"] == in_memory["dense_perplexity"]
    key = lambda r: (r["method"], r["setting"], r["perplexity"], r["sparsity"])  # noqa: E731
    assert [key(r) for r in streamed["rows"]] == [key(r) for r in in_memory["rows"]]
    assert list(tmp_path.iterdir()) == []  # each cell's model was removed once measured
    with pytest.raises(api.ConfigError, match="allocation=global ranks every layer at once, which is not streamed"):
        compare(folder, tok, ["wanda"], ["0.5"], {**shared, "allocation": "global"}, eval_config, progress=False)
