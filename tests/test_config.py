import json
from dataclasses import FrozenInstanceError

import pytest

from secateurs.config import ConfigError, EvalConfig, LayerRule, PruneConfig, Recipe, StructuredConfig


def test_defaults_follow_the_papers():
    c = PruneConfig()
    assert (c.method, c.resolved.sparsity, c.pattern, c.resolved.group) == ("wanda", 0.5, "unstructured", "row")
    assert (c.calib_samples, c.calib_seqlen, c.resolved.propagate) == (128, 2048, "pruned")
    assert PruneConfig(method="magnitude").resolved.group == "layer"
    assert PruneConfig(method="sparsegpt").needs_calibration and not PruneConfig(method="magnitude").needs_calibration
    # true-sequential: the SparseGPT LLaMA script's option, on by default for sparsegpt only
    assert PruneConfig(method="sparsegpt").resolved.true_sequential
    assert not PruneConfig(method="wanda").resolved.true_sequential
    assert not PruneConfig(method="wanda", allocation="global").resolved.true_sequential
    assert PruneConfig(method="wanda", allocation="global").resolved.propagate == "dense"
    # weight reconstruction is opt-in; asking for it makes even magnitude gather X^T X from calibration data
    assert (c.refine, c.resolved.refine_iters, c.resolved.refine_damp, c.needs) == ("none", 20, 0.1, "norms")
    refined = PruneConfig(method="magnitude", refine="admm")
    assert refined.needs_calibration and refined.needs == "hessian"


def test_defaults_that_depend_on_the_method_stay_unresolved_in_the_config():
    """A copy with another method gets that method's defaults (the compare bug: SparseGPT run at once)."""
    wanda = PruneConfig(method="wanda")
    assert (wanda.group, wanda.true_sequential, wanda.propagate, wanda.sparsity) == (None, None, None, None)
    sparsegpt = wanda.override(method="sparsegpt")
    assert sparsegpt.resolved.true_sequential and sparsegpt.resolved.group == "lazy-batch"
    assert sparsegpt == PruneConfig(method="sparsegpt")
    with pytest.raises(FrozenInstanceError):
        wanda.method = "sparsegpt"


def test_a_method_owns_its_options():
    c = PruneConfig.from_dict({"method": "sparsegpt", "percdamp": 0.05})  # as recipes write them
    assert c.options == {"percdamp": 0.05} and c.build_method().percdamp == 0.05
    assert c.to_dict()["options"] == {"percdamp": 0.05}
    assert PruneConfig.from_dict(c.to_dict()) == c
    assert PruneConfig(method="magnitude", options={"threshold": 0.1}).build_method().meets_target is False
    with pytest.raises(ConfigError, match=r"method wanda has no option 'percdamp' \(it has none\)"):
        PruneConfig(method="wanda", options={"percdamp": 0.05})
    with pytest.raises(ConfigError, match="percdamp is an option of alps and sparsegpt, not of wanda"):
        PruneConfig.from_dict({"method": "wanda", "percdamp": 0.05})
    with pytest.raises(ConfigError, match="sparsegpt option blocksize must be int, got str 'x'"):
        PruneConfig(method="sparsegpt", options={"blocksize": "x"})


def test_nm_implies_sparsity():
    assert PruneConfig(pattern="2:4").resolved.sparsity == 0.5
    assert PruneConfig(pattern="1:4").resolved.sparsity == 0.75
    assert PruneConfig(pattern="2:4", sparsity=0.5).pattern == "2:4"
    with pytest.raises(ConfigError, match="contradicts pattern 2:4"):
        PruneConfig(pattern="2:4", sparsity=0.6)


@pytest.mark.parametrize("kwargs, message", [
    (dict(sparsity=1.0), r"sparsity must be in \[0, 1\)"),
    (dict(sparsity=-0.1), r"sparsity must be in \[0, 1\)"),
    (dict(method="obc"), "unknown 'obc'"),
    (dict(pattern="4:4"), "pattern"),
    (dict(pattern="block:0"), "pattern"),
    (dict(method="sparsegpt", group="row"), "not offered by sparsegpt"),
    (dict(method="wanda", group="global"), "group=global is now allocation=global"),
    (dict(method="sparsegpt", allocation="global"), "sparsegpt chooses its masks inside each layer"),
    (dict(method="magnitude", options={"threshold": 0.1}, allocation="global"), "a threshold decides every layer"),
    (dict(method="wanda", options={"threshold": 0.1}), "method wanda has no option 'threshold'"),
    (dict(method="wanda", allocation="global", propagate="pruned"), "needs propagate=dense"),
    (dict(method="wanda", allocation="global", true_sequential=True), "true_sequential does not apply"),
    (dict(allocation="owls"), "allocation must be one of uniform, global, owl"),
    (dict(layer_sparsity=["mlp=1.5"]), r"\[0, 1\)"),
    (dict(layer_sparsity=["mlp"]), "REGEX=S"),
    (dict(pattern="2:4", layer_sparsity=["mlp=0.3"]), "N:M"),
    (dict(include=["(unclosed"]), "bad regex"),
    (dict(calib_samples=0), "calib_samples"),
    (dict(method="sparsegpt", options={"percdamp": 0}), "percdamp"),
    (dict(refine="obs"), "refine must be one of"),
    (dict(refine="admm", refine_iters=0), "refine_iters must be >= 1"),
    (dict(refine="admm", refine_damp=-1), "refine_damp must be >= 0"),
    (dict(method="magnitude", allocation="global", refine="admm"), "no layer can be refined"),
    (dict(refine_iters=5), "refine_iters is read only with refine=admm"),
    (dict(device="gpu"), "device 'gpu' is not a torch device"),
])
def test_validation_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        PruneConfig(**kwargs)


def test_a_structured_config_checks_its_device_name_too():
    with pytest.raises(ConfigError, match="device 'gpu' is not a torch device"):
        StructuredConfig(method="channels", ratio=0.25, device="gpu")


def test_layer_rules_and_scope():
    c = PruneConfig(sparsity=0.5, layer_sparsity=["blocks:0-4=0.3", r"mlp\.down_proj=0.7", "blocks:2=0.1"])
    assert c.sparsity_for("model.layers.1.self_attn.q_proj", 1) == 0.3
    assert c.sparsity_for("model.layers.2.self_attn.q_proj", 2) == 0.1
    assert c.sparsity_for("model.layers.3.mlp.down_proj", 3) == 0.7  # last matching rule wins
    assert c.sparsity_for("model.layers.9.mlp.up_proj", 9) == 0.5
    assert LayerRule.parse("blocks:5-9=0.6") == LayerRule(0.6, blocks=(5, 9))
    c = PruneConfig(include=["attention"], exclude=[r"\.v_proj$"])
    assert c.selects("model.layers.0.self_attn.q_proj", "attention")
    assert not c.selects("model.layers.0.self_attn.v_proj", "attention")
    assert not c.selects("model.layers.0.mlp.up_proj", "mlp")
    assert PruneConfig(include=[r"layers\.1\."]).selects("model.layers.1.mlp.up_proj", "mlp")


def test_json_yaml_round_trip(tmp_path):
    c = PruneConfig(method="sparsegpt", pattern="4:8", layer_sparsity=[], include=["mlp"], calib_samples=16)
    assert PruneConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    recipe = Recipe([c, c.override(include=["attention"])], EvalConfig(windows=4))
    for suffix in (".yaml", ".json"):
        path = tmp_path / f"r{suffix}"
        recipe.save(path)
        assert Recipe.load(path).to_dict() == recipe.to_dict()


def test_recipe_stages_and_overrides(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("method: wanda\ncalib_samples: 8\nstages:\n  - {include: [attention], sparsity: 0.4}\n"
                    "  - {include: [mlp], sparsity: 0.6, method: sparsegpt}\neval: {windows: 2}\n")
    r = Recipe.load(path, overrides={"calib_seqlen": 64})
    assert [(s.method, s.include, s.sparsity, s.calib_seqlen) for s in r.stages] == [
        ("wanda", ("attention",), 0.4, 64), ("sparsegpt", ("mlp",), 0.6, 64)]
    assert r.eval.windows == 2
    path.write_text("method: wanda\nsparsty: 0.5\n")
    with pytest.raises(ConfigError, match="unknown config field"):
        Recipe.load(path)
    with pytest.raises(ConfigError, match="does not exist"):
        Recipe.load(tmp_path / "missing.yaml")


@pytest.mark.parametrize("name, text, message", [
    ("r.yaml", "method: [wanda\n", "expected ',' or ']', but got '<stream end>' at line 2, column 1"),
    ("r.yaml", "a: b: c\n", "mapping values are not allowed here at line 1, column 5"),
    ("r.json", '{"method": }', "Expecting value: line 1 column 12 (char 11)"),
])
def test_a_recipe_that_does_not_parse_is_one_line_that_says_where(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError) as info:
        Recipe.load(tmp_path / name)
    assert str(info.value) == f"cannot parse {str(tmp_path / name)!r}: {message}"


def test_an_unavailable_device_is_one_line_even_when_torch_gives_no_message(monkeypatch):
    import torch

    from secateurs.config import check_device

    def empty(*args, **kwargs):
        raise AssertionError()  # what a bare `assert` in a backend's lazy init raises

    monkeypatch.setattr(torch, "empty", empty)
    with pytest.raises(ConfigError, match=r"^device 'cuda' is not available here: AssertionError$"):
        check_device("cuda")


@pytest.mark.parametrize("text, message", [
    ("method: wanda\nstages: {sparsity: 0.5}\n", "stages must be a list of mappings, got dict {'sparsity': 0.5}"),
    ("method: wanda\nstages:\n  - {sparsity: 0.3}\n  - 0.5\n",
     "stages[1] must be a mapping of config fields, e.g. {sparsity: 0.5}, got float 0.5"),
    ("method: wanda\nstages:\n  - {sparsity: 0.3}\n  - {sparsity: 1.5}\n",
     "stages[1]: sparsity must be in [0, 1), got 1.5"),
    ("method: wanda\nstages:\n  - {sparsity: 1.5}\n", "sparsity must be in [0, 1), got 1.5"),  # one stage: no index
    ("method: wanda\neval: 16\n", "eval must be a mapping of evaluation fields, got int 16"),
    ("method: wanda\neval: {windowz: 4}\n",
     "unknown eval field(s): windowz (known: data, seqlen, windows, stride, batch_size, metric)"),
])
def test_a_recipe_of_the_wrong_shape_says_which_part(tmp_path, text, message):
    (tmp_path / "r.yaml").write_text(text)
    with pytest.raises(ConfigError) as info:
        Recipe.load(tmp_path / "r.yaml")
    assert str(info.value) == message
