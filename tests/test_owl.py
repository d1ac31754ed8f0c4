"""OWL layer allocation: every block's target from its outlier ratio on the dense model, checked against the
paper's arithmetic done by hand, the mean kept exactly, streamed as in memory, bad settings refused."""

import json

import pytest
import torch
import transformers as tf

from conftest import FAMILIES, VOCAB, tiny_model
from secateurs import ConfigError, PruneConfig, prune
from secateurs.api import prune_streamed
from secateurs.models.arch import find_blocks, find_linears

CALIB = dict(calib_samples=6, calib_seqlen=32, batch_size=2)


@pytest.fixture
def ids():
    return torch.randint(0, VOCAB, (6, 32), generator=torch.Generator().manual_seed(2))


def by_hand(model, ids, m: float, lam: float, sparsity: float) -> list[float]:
    """Every block's OWL target, from the dense model's inputs to each linear (a plain forward)."""
    _, blocks = find_blocks(model)
    norms, hooks = {}, []
    for i, block in enumerate(blocks):
        for name, linear in find_linears(block).items():
            def hook(module, args, key=(i, name)):  # float32, summed batch by batch, as the engine does
                x = args[0].reshape(-1, args[0].shape[-1]).float()
                norms[key] = norms.get(key, 0) + (x * x).sum(0)
            hooks.append(linear.register_forward_pre_hook(hook))
    with torch.no_grad():
        for start in range(0, len(ids), CALIB["batch_size"]):
            model(ids[start:start + CALIB["batch_size"]])
    for h in hooks:
        h.remove()
    ratios = []
    for i, block in enumerate(blocks):
        scores = torch.cat([(linear.weight.float().abs() * norms[(i, name)].sqrt()).flatten()
                            for name, linear in find_linears(block).items()])
        mean = float(scores.sum(dtype=torch.float64)) / scores.numel()
        ratios.append(int((scores > m * mean).sum()) / scores.numel())
    lo, hi = min(ratios), max(ratios)
    x = [2 * lam * (d - lo) / (hi - lo) for d in ratios]
    return [sparsity - xi + sum(x) / len(x) for xi in x]


def block_targets(result) -> list[float]:
    targets = {}
    for r in result.layers:
        targets.setdefault(r.block, set()).add(r.target)
    assert all(len(t) == 1 for t in targets.values())  # every layer of a block gets the block's target
    return [next(iter(targets[b])) for b in sorted(targets)]


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_block_targets_are_the_papers_arithmetic_and_keep_the_mean(method, ids):
    model = tiny_model("llama")
    config = tf.LlamaConfig(**{**model.config.to_dict(), "num_hidden_layers": 4})
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    want = by_hand(model, ids, m=2.0, lam=0.1, sparsity=0.6)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    result = prune(model, PruneConfig(method=method, sparsity=0.6, allocation="owl", owl_m=2.0, owl_lambda=0.1,
                                      **CALIB), ids, progress=False)
    got = block_targets(result)
    assert got == pytest.approx(want, abs=1e-9) and len(set(round(t, 6) for t in got)) > 1
    assert sum(got) / len(got) == pytest.approx(0.6, abs=1e-12) and max(got) - min(got) <= 0.2 + 1e-12
    for r in result.layers:  # each layer meets its block's target
        assert r.sparsity == pytest.approx(r.target, abs=2 / r.shape[1])
    if method == "wanda":  # no update: the first walk measured the weights and left every one as it was
        for k, v in model.state_dict().items():
            assert torch.equal(v[v != 0], dense[k][v != 0]), k


@pytest.mark.parametrize("family", FAMILIES)
def test_owl_runs_on_every_family(family, ids):
    result = prune(tiny_model(family), PruneConfig(method="wanda", sparsity=0.5, allocation="owl", **CALIB), ids,
                   progress=False)
    assert sum(block_targets(result)) / 2 == pytest.approx(0.5, abs=1e-12)
    assert result.sparsity == pytest.approx(0.5, abs=0.02)


def test_a_streamed_owl_prune_equals_the_prune_in_memory(ids, tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "in", max_shard_size="100KB")
    config = PruneConfig(method="sparsegpt", sparsity=0.5, allocation="owl", owl_m=2.0, **CALIB)
    expected = prune(model, config, ids, progress=False)
    result = prune_streamed(tmp_path / "in", config, ids, tmp_path / "out", progress=False)
    streamed = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), streamed.state_dict().values()))
    assert result.layers == expected.layers


@pytest.mark.parametrize("fields, match", [
    (dict(pattern="2:4"), "N:M"),
    (dict(method="magnitude"), "does not gather"),
    (dict(layer_sparsity=("mlp=0.6",)), "contradict allocation=owl"),
    (dict(owl_lambda=0.6), r"owl_lambda must be in \(0, 0.5\)"),
    (dict(owl_m=0.0), "owl_m must be > 0"),
])
def test_settings_owl_cannot_take_are_refused(fields, match):
    with pytest.raises(ConfigError, match=match):
        PruneConfig(**{"method": "wanda", "allocation": "owl", **fields})
    with pytest.raises(ConfigError, match="read only with allocation=owl"):
        PruneConfig(method="wanda", owl_m=3.0)


def test_a_lambda_too_wide_for_the_sparsity_is_refused_before_any_weight_changes(ids):
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="outside \\[0, 1\\): give a smaller owl_lambda"):
        prune(model, PruneConfig(method="wanda", sparsity=0.05, allocation="owl", owl_m=2.0, owl_lambda=0.4,
                                 **CALIB), ids, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_cli_takes_owl(tmp_path, tiny_dir):
    from secateurs.cli import main

    assert main(["prune", "--model", str(tiny_dir / "model"), "--quiet", "--calib-data", str(tiny_dir / "train.txt"),
                 "--calib-samples", "4", "--calib-seqlen", "32", "--no-eval", "--method", "wanda", "--sparsity", "0.5",
                 "--allocation", "owl", "--owl-m", "2", "--owl-lambda", "0.05", "--output", str(tmp_path / "o"),
                 "--report", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["config"]["allocation"] == "owl" and report["config"]["owl_lambda"] == 0.05
    targets = {d["block"]: d["target"] for d in report["per_layer_detail"]}
    assert sum(targets.values()) / len(targets) == pytest.approx(0.5)
