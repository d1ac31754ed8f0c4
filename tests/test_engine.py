import copy
import dataclasses
import re

import pytest
import torch
import transformers as tf

from conftest import tiny_model
from secateurs import PruneConfig, prune
from secateurs.errors import ModelLoadError
from secateurs.config import ConfigError
from secateurs.engine import capture_inputs, make_plan
from secateurs.engine import layout as layout_module, sequential
from secateurs.engine.walk import run_block
from secateurs.models import ArchitectureError, find_blocks, find_linears, role_of, weight_of
from secateurs.patterns import check_nm

BLOCKS = {"llama": "model.layers", "qwen2": "model.layers", "mistral": "model.layers", "gemma": "model.layers",
          "gemma3": "model.layers", "opt": "model.decoder.layers", "gpt2": "transformer.h", "phi": "model.layers"}


def test_find_blocks_every_family(family):
    model = tiny_model(family)
    name, blocks = find_blocks(model)
    assert name == BLOCKS[family] and len(blocks) == 2
    linears = find_linears(blocks[0])
    assert len(linears) >= 4
    assert {role_of(n) for n in linears} == {"attention", "mlp"}


def test_no_blocks_is_a_clear_error():
    with pytest.raises(ArchitectureError, match="no repeated blocks"):
        find_blocks(torch.nn.Sequential(torch.nn.Linear(4, 4)))


@torch.no_grad()
def test_captured_calls_reproduce_the_dense_forward(family, calib_ids):
    """Walking the blocks with the captured per-block arguments gives the model's own hidden states."""
    model = tiny_model(family)
    _, blocks = find_blocks(model)
    hidden, calls = capture_inputs(model, blocks, calib_ids, batch_size=4)
    assert [h.shape[0] for h in hidden] == [4, 2]
    ref = model(calib_ids, output_hidden_states=True, use_cache=False).hidden_states
    h = hidden
    for i, block in enumerate(blocks[:-1]):  # the last entry of hidden_states has the final norm applied
        h = run_block(block, h, calls[i], "cpu", keep=True)
        assert torch.allclose(torch.cat(h), ref[i + 1], atol=1e-5), f"block {i}"


@pytest.mark.parametrize("method, pattern", [("magnitude", "unstructured"), ("wanda", "unstructured"),
                                             ("sparsegpt", "unstructured"), ("wanda", "2:4"),
                                             ("sparsegpt", "4:8"), ("sparsegpt", "block:8")])
def test_prune_every_family(family, method, pattern, calib_ids, tmp_path):
    model = tiny_model(family)
    cfg = PruneConfig(method=method, pattern=pattern, batch_size=4)
    x = torch.randint(0, 128, (1, 16))
    embeddings = model.get_input_embeddings().weight.clone()
    head = model.get_output_embeddings().weight.clone()
    result = prune(model, cfg, calib_ids, progress=False)
    _, blocks = find_blocks(model)
    expected = {n for i, b in enumerate(blocks) for n in find_linears(b, f"{BLOCKS[family]}.{i}.")}
    assert set(result.per_layer) == expected
    for name, module in model.named_modules():
        if name in expected:
            W = weight_of(module)
            assert abs((W == 0).float().mean().item() - 0.5) <= 1 / W.shape[1] + 1e-6, name
            if pattern != "unstructured" and ":" in pattern and not pattern.startswith("block"):
                n, m = map(int, pattern.split(":"))
                assert check_nm(W, n, m) == 0
    assert abs(result.sparsity - 0.5) < 0.01
    # embeddings and head untouched, output shape intact
    assert torch.equal(model.get_input_embeddings().weight, embeddings)
    assert torch.equal(model.get_output_embeddings().weight, head)
    logits = model(x).logits
    assert logits.shape == (1, 16, 128) and torch.isfinite(logits).all()
    model.save_pretrained(tmp_path)
    again = tf.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(again(x).logits, logits)


def test_global_magnitude_ranks_across_layers():
    model = tiny_model("llama")
    with torch.no_grad():  # make block 1 tiny: a global ranking must take most of its weights
        for m in find_linears(find_blocks(model)[1][1]).values():
            m.weight.mul_(0.01)
    result = prune(model, PruneConfig(method="magnitude", allocation="global", sparsity=0.5), progress=False)
    by_block = {}
    for r in result.layers:
        by_block.setdefault(r.block, []).append(r)
    frac = {b: sum(r.zeros for r in rs) / sum(r.numel for r in rs) for b, rs in by_block.items()}
    assert frac[1] > 0.95 and frac[0] < 0.05
    assert abs(result.sparsity - 0.5) < 1e-3


def test_global_wanda_and_threshold(calib_ids):
    model = tiny_model("qwen2")
    r = prune(model, PruneConfig(method="wanda", allocation="global", sparsity=0.4, batch_size=3), calib_ids,
              progress=False)
    assert abs(r.sparsity - 0.4) < 1e-3 and r.configs[0].resolved.propagate == "dense"
    model = tiny_model("qwen2")
    r = prune(model, PruneConfig(method="magnitude", options={"threshold": 0.01}), progress=False)
    for name, module in model.named_modules():
        if name in r.per_layer:
            W = weight_of(module)
            assert W[W != 0].abs().min() >= 0.01
    assert 0 < r.sparsity < 1


def test_scope_and_layer_sparsity(calib_ids):
    model = tiny_model("llama")
    cfg = PruneConfig(method="wanda", include=["mlp"], layer_sparsity=["blocks:1=0.75", r"down_proj=0.25"])
    r = prune(model, cfg, calib_ids, progress=False)
    assert all(role_of(n) == "mlp" for n in r.per_layer)
    assert r.per_layer["model.layers.0.mlp.up_proj"] == 0.5
    assert r.per_layer["model.layers.1.mlp.up_proj"] == 0.75
    assert r.per_layer["model.layers.1.mlp.down_proj"] == 0.25
    assert (model.model.layers[0].self_attn.q_proj.weight == 0).sum() == 0


def test_name_rules_that_match_nothing_are_refused_before_any_weight_changes():
    model = tiny_model("llama")
    before = copy.deepcopy(model.state_dict())
    for bad, message in [(dict(layer_sparsity=["blocks:2=0.7"]), "the model has 2 blocks"),
                         (dict(layer_sparsity=["down_porj=0.7"]), "'down_porj=0.7' matches no linear layer"),
                         (dict(exclude=["k_porj"]), "'k_porj' matches no linear layer")]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            prune(model, [PruneConfig(method="magnitude"), PruneConfig(method="magnitude", **bad)], progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # a rule outside this config's scope is valid (the shared defaults of a staged recipe): it changes nothing
    r = prune(model, PruneConfig(method="magnitude", include=["attention"], layer_sparsity=["mlp=0.7"]),
              progress=False)
    assert set(r.per_layer.values()) == {0.5} and all(role_of(n) == "attention" for n in r.per_layer)


def test_windows_longer_than_the_models_context_are_refused():
    from secateurs import EvalConfig, evaluate
    from secateurs.training import TrainConfig, train

    model = tiny_model("gpt2")  # learned positions: 256 of them; past that its embedding lookup fails
    before = copy.deepcopy(model.state_dict())
    ids = torch.randint(0, 100, (2, 257))
    message = "is longer than the model's context (256 positions): use 256 or less"
    with pytest.raises(ConfigError, match=re.escape("calib_seqlen 257 " + message)):
        prune(model, PruneConfig(method="wanda"), ids, progress=False)
    with pytest.raises(ConfigError, match=re.escape("eval seqlen 257 " + message)):
        evaluate(model, None, EvalConfig(seqlen=257), ids=ids.reshape(-1), progress=False)
    with pytest.raises(ConfigError, match=re.escape("training seqlen 257 " + message)):
        train(model, ids.reshape(-1), TrainConfig(steps=1, seqlen=257), progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    r = prune(model, PruneConfig(method="wanda"), ids[:, :256], progress=False)  # the full context is fine
    assert abs(r.sparsity - 0.5) < 1e-3


@pytest.mark.parametrize("calibration, message", [
    (torch.full((2, 16), 128), "calibration holds token id 128, outside the model's vocabulary (0-127)"),
    (torch.full((2, 16), -1), "calibration holds token id -1, outside the model's vocabulary (0-127)"),
    (torch.zeros(0, 16, dtype=torch.long), "got (0, 16) torch.int64"),
    (["some text", "not ids"], "must be token ids of shape (samples, seqlen) (see calibration_data)"),
    ([[1, 2, 3], [4, 5]], "must be token ids of shape (samples, seqlen) (see calibration_data)"),
])
def test_calibration_the_model_cannot_embed_is_refused(calibration, message):
    model = tiny_model("llama")  # 128 token ids
    with pytest.raises(ConfigError, match=re.escape(message)):
        prune(model, PruneConfig(method="wanda"), calibration, progress=False)


def test_evaluation_ids_outside_the_vocabulary_are_refused():
    from secateurs import EvalConfig, evaluate

    with pytest.raises(ConfigError, match=re.escape("evaluation text holds token id 500, outside the model's vocab")):
        evaluate(tiny_model("llama"), None, EvalConfig(seqlen=16, windows=1), ids=torch.full((64,), 500),
                 progress=False)


def test_propagate_and_true_sequential_change_results(calib_ids):
    def run(**kw):
        model = tiny_model("llama")
        prune(model, PruneConfig(method="sparsegpt", **kw), calib_ids, progress=False)
        return model.model.layers[1].mlp.down_proj.weight.clone(), model.model.layers[0].mlp.down_proj.weight.clone()

    base1, base0 = run(true_sequential=False)
    dense1, dense0 = run(propagate="dense", true_sequential=False)
    seq1, seq0 = run(true_sequential=True)
    # block 0 sees identical inputs either way; block 1 sees dense vs pruned outputs of block 0
    assert torch.equal(base0, dense0) and not torch.equal(base1, dense1)
    # true-sequential re-observes down_proj's input after up/gate were pruned: block 0 differs already
    assert not torch.equal(base0, seq0)


EXPECTED_GROUPS = {  # input groups in execution order, as learnt from one call of block 0
    "llama": [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
              ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]],
    "opt": [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.out_proj"], ["fc1"], ["fc2"]],
    "gpt2": [["attn.c_attn"], ["attn.c_proj"], ["mlp.c_fc"], ["mlp.c_proj"]],
    # Phi runs attention and MLP side by side on one normalised input: q, k, v and fc1 share it
    "phi": [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.fc1"], ["self_attn.dense"], ["mlp.fc2"]],
}


@pytest.mark.parametrize("family", sorted(EXPECTED_GROUPS))
def test_layout_groups_and_replayable_children(family, calib_ids):
    model = tiny_model(family)
    name, blocks = find_blocks(model)
    hidden, calls = capture_inputs(model, blocks, calib_ids, 2)
    prefix = f"{name}.0."
    layout = layout_module.learn_layout(blocks[0], prefix, find_linears(blocks[0], prefix), calls[0][0], hidden[0],
                                        "cpu")
    assert layout.groups == EXPECTED_GROUPS[family]
    attention = {"llama": "self_attn", "opt": "self_attn", "gpt2": "attn", "phi": "self_attn"}[family]
    assert layout.children[attention].linear == EXPECTED_GROUPS[family][1][0]  # returns o_proj's output as is


def test_true_sequential_replay_is_exact(family, calib_ids, monkeypatch):
    """Replaying finished children from their last linear's cached input changes no bit of the result."""
    def run(replay: bool):
        model = tiny_model(family)
        with monkeypatch.context() as m:
            if not replay:
                learn = layout_module.learn_layout
                m.setattr(sequential, "learn_layout", lambda *a: dataclasses.replace(learn(*a), children={}))
            prune(model, PruneConfig(method="sparsegpt", true_sequential=True, batch_size=2), calib_ids,
                  progress=False)
        return model.state_dict()

    replayed, recomputed = run(True), run(False)
    assert all(torch.equal(replayed[k], recomputed[k]) for k in replayed)


@pytest.mark.parametrize("replay, expected", [(True, 1 + 3 + 3), (False, 1 + 3 * 5)])
def test_true_sequential_replays_attention_instead_of_recomputing_it(calib_ids, monkeypatch, replay, expected):
    model = tiny_model("llama")
    if not replay:
        learn = layout_module.learn_layout
        monkeypatch.setattr(sequential, "learn_layout", lambda *a: dataclasses.replace(learn(*a), children={}))
    calls = []
    model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda m, a: calls.append(1))
    prune(model, PruneConfig(method="sparsegpt", true_sequential=True, batch_size=2), calib_ids, progress=False)
    # block 0, 3 batches: one learns the layout, q/k/v are observed (stopping at q_proj), o_proj is observed
    # (attention runs); observing gate/up and down_proj and computing the outputs replay o_proj instead
    assert len(calls) == expected


def test_wanda_needs_calibration():
    with pytest.raises(ValueError, match="needs calibration data"):
        prune(tiny_model("llama"), PruneConfig(method="wanda"), None, progress=False)
    with pytest.raises(ValueError, match="magnitude with refine=admm needs calibration data"):
        prune(tiny_model("llama"), PruneConfig(method="magnitude", refine="admm"), None, progress=False)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_non_finite_calibration_inputs_are_a_clear_error(method, calib_ids):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0] = 3e38  # finite, but block 1's down_proj input overflows
    with pytest.raises(sequential.CalibrationError, match=r"layers\.1\.mlp\.down_proj: .*inf or NaN"):
        prune(model, PruneConfig(method=method), calib_ids, progress=False)


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # GPT-2: Conv1D stores the transposed weight
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_refine_keeps_the_mask_and_brings_the_model_closer_to_dense(family, pattern, calib_ids):
    """Magnitude's mask depends on the weights alone, so refining must leave it unchanged; only the kept
    weights move, and the pruned model's logits get closer to the dense model's."""
    with torch.no_grad():
        dense = tiny_model(family)(calib_ids).logits
    runs = {}
    for refine in ("none", "admm"):
        model = tiny_model(family)
        r = prune(model, PruneConfig(method="magnitude", pattern=pattern, refine=refine), calib_ids, progress=False)
        _, blocks = find_blocks(model)
        zeros = {n: weight_of(m) == 0 for b in blocks for n, m in find_linears(b).items()}
        with torch.no_grad():
            error = float((model(calib_ids).logits - dense).pow(2).mean())
        runs[refine] = (zeros, error, r.sparsity)
    (zeros_none, err_none, sp_none), (zeros_admm, err_admm, sp_admm) = runs["none"], runs["admm"]
    assert zeros_none.keys() == zeros_admm.keys()
    assert all(torch.equal(zeros_none[n], zeros_admm[n]) for n in zeros_none)
    assert sp_none == sp_admm == 0.5
    assert err_admm < 0.5 * err_none
    errors = {}
    for refine in ("none", "admm"):  # SparseGPT updates weights itself, yet re-fitting still helps
        model = tiny_model(family)
        prune(model, PruneConfig(method="sparsegpt", pattern=pattern, refine=refine), calib_ids, progress=False)
        with torch.no_grad():
            errors[refine] = float((model(calib_ids).logits - dense).pow(2).mean())
    assert errors["admm"] < 0.9 * errors["none"]


def test_pattern_that_does_not_tile_is_refused_before_pruning():
    model = tiny_model("gpt2")
    before = model.transformer.h[0].mlp.c_fc.weight.clone()
    with pytest.raises(ValueError, match="does not tile"):
        make_plan(model, PruneConfig(method="magnitude", pattern="block:48"))
    assert torch.equal(model.transformer.h[0].mlp.c_fc.weight, before)


def test_multi_stage_recipe(calib_ids):
    model = tiny_model("llama")
    stages = [PruneConfig(method="wanda", include=["attention"], sparsity=0.25),
              PruneConfig(method="sparsegpt", include=["mlp"], sparsity=0.75)]
    r = prune(model, stages, calib_ids, progress=False)
    assert {round(v, 4) for n, v in r.per_layer.items() if role_of(n) == "attention"} == {0.25}
    assert {round(v, 4) for n, v in r.per_layer.items() if role_of(n) == "mlp"} == {0.75}
    assert r.stage == "complete" and "calibrating" in r.stage_seconds


def test_gram_lower_matches_full_product():
    from secateurs.engine.sequential import gram_lower_
    from secateurs.linalg import mirror_lower_

    for n in (7, 64, 576, 1000):
        x = torch.randn(50, n, dtype=torch.float64)
        H = torch.zeros(n, n, dtype=torch.float64)
        gram_lower_(H, x)
        gram_lower_(H, 2 * x)  # accumulates
        lower = torch.tril(H)
        for chunk in (3, 512):  # in place, a few rows at a time: the lower triangle mirrored, nothing else
            full = mirror_lower_(H.clone(), chunk)
            assert torch.equal(full, lower + torch.tril(H, -1).t()) and torch.equal(full, full.t())
        assert torch.allclose(full, 5 * x.t() @ x)


@torch.no_grad()
def test_layers_reading_the_same_input_share_statistics(calib_ids):
    from secateurs.engine.sequential import Observer

    model = tiny_model("llama")
    _, blocks = find_blocks(model)
    hidden, calls = capture_inputs(model, blocks, calib_ids, batch_size=3)
    layers = find_linears(blocks[0])
    layout = layout_module.learn_layout(blocks[0], "", layers, calls[0][0], hidden[0], "cpu")
    obs = Observer(layers, "hessian", {n: k for k, g in enumerate(layout.groups) for n in g})
    run_block(blocks[0], hidden, calls[0], "cpu", keep=False, observer=obs)
    obs.remove()
    g = obs.group_of
    assert g["self_attn.q_proj"] == g["self_attn.k_proj"] == g["self_attn.v_proj"]
    assert g["mlp.gate_proj"] == g["mlp.up_proj"]
    assert len(set(g.values())) == 4 and obs.order[0] == "self_attn.q_proj" and obs.order[-1] == "mlp.down_proj"
    st = obs.stats_for("mlp.down_proj")
    assert st.tokens == 6 * 32 and st.hessian.shape == (128, 128)
    assert torch.allclose(st.sq_norms, torch.diag(st.hessian))


def test_blocks_after_the_last_pruned_one_are_never_run(calib_ids):
    model = tiny_model("llama")
    calls = []
    model.model.layers[1].self_attn.q_proj.register_forward_pre_hook(lambda m, a: calls.append(1))
    model.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda m, a: calls.append(0))
    r = prune(model, PruneConfig(method="sparsegpt", include=[r"layers\.0\."], batch_size=2), calib_ids,
              progress=False)
    assert len(r.layers) == 7 and 1 not in calls
    # block 0: one batch learns the layout, three are observed, and nothing is recomputed (it would be 7)
    assert calls.count(0) == 1 + 3


def test_verify_layer_counts_what_it_checked_and_names_each_violation():
    from secateurs.engine.sequential import VerificationError, verify_layer
    from secateurs.methods.base import LayerTarget
    from secateurs.patterns import Pattern

    def target(pattern, sparsity=0.5):
        return LayerTarget(Pattern.parse(pattern), sparsity)

    W = torch.arange(1.0, 17.0).reshape(2, 8)
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[:, ::2] = True  # every other weight: 2 kept in every 4, half of each row
    W[mask] = 0
    W[0, 1] = 0.0  # a kept weight that was zero already counts as a zero, not as pruned
    assert verify_layer("w", W, mask, target("unstructured"), True) == (8, 9)
    assert verify_layer("w", W, mask, target("2:4"), True) == (8, 9)

    left = W.clone()
    left[1, 2] = 7.0  # selected for pruning, still non-zero
    with pytest.raises(VerificationError, match="w: weights selected for pruning are not zero"):
        verify_layer("w", left, mask, target("unstructured"), True)
    three = W.clone()
    three[1, 0], mask3 = 5.0, mask.clone()
    mask3[1, 0] = False  # row 1, columns 0-3 now keep 3 of 4
    with pytest.raises(VerificationError, match="1 groups break the 2:4 pattern"):
        verify_layer("w", three, mask3, target("2:4"), False)
    with pytest.raises(VerificationError, match="pruned 0.5000 of the weights, target 0.7500"):
        verify_layer("w", W, mask, target("unstructured", 0.75), True)
    assert verify_layer("w", W, mask, target("unstructured", 0.75), False) == (8, 9)  # threshold mode: no fraction
    with pytest.raises(VerificationError, match="4 tiles are only partly pruned under block:2"):
        verify_layer("w", W, mask, target("block:2"), True)
    broken = W.clone()
    broken[0, 3], broken[1, 5] = float("nan"), float("-inf")  # kept weights an update blew up
    with pytest.raises(VerificationError, match=r"^w: the method left 2 of its 16 weights inf or NaN$"):
        verify_layer("w", broken, mask, target("unstructured"), True)


def test_a_method_that_breaks_its_own_mask_fails_loudly_and_changes_nothing(calib_ids, monkeypatch):
    from secateurs.engine.sequential import VerificationError
    from secateurs.methods.base import METHODS, Method

    class Careless(Method):
        needs = "norms"

        def prune(self, W, stats, target):
            mask = torch.zeros_like(W, dtype=torch.bool)
            mask[:, : W.shape[1] // 2] = True
            return mask  # claims half of every row, zeroes nothing

    monkeypatch.setitem(METHODS, "careless", Careless)
    model = tiny_model("llama")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(VerificationError, match="q_proj: weights selected for pruning are not zero"):
        prune(model, PruneConfig(method="careless", sparsity=0.5, batch_size=4), calib_ids, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_method_whose_update_overflows_fails_loudly_and_changes_nothing(calib_ids, monkeypatch):
    """A weight update that leaves inf or NaN (an overflowing OBS or ADMM step) must never be saved."""
    from secateurs.engine.sequential import VerificationError
    from secateurs.methods.base import METHODS
    from secateurs.methods.wanda import Wanda

    class Overflowing(Wanda):
        def prune(self, W, stats, target):
            mask = super().prune(W, stats, target)  # a correct mask, then an update that overflows:
            W[0, ~mask[0]] = float("inf")  # every weight row 0 keeps
            W[1, 0] = float("nan")  # and one more, kept or pruned
            return mask

    monkeypatch.setitem(METHODS, "overflowing", Overflowing)
    model = tiny_model("llama")
    before = copy.deepcopy(model.state_dict())
    hidden = model.config.hidden_size
    message = (f"model.layers.0.self_attn.q_proj: the method left {hidden // 2 + 1} of its {hidden * hidden} "
               "weights inf or NaN")
    with pytest.raises(VerificationError, match=re.escape(message)):
        prune(model, PruneConfig(method="overflowing", sparsity=0.5, batch_size=4), calib_ids, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_weight_holding_inf_or_nan_is_refused_before_anything_changes(calib_ids, bad):
    """Scores built from such a weight rank nothing; the plan refuses it with the layer's name and count."""
    model = tiny_model("llama")
    W = weight_of(model.model.layers[1].mlp.up_proj)
    W[0, 3] = bad
    W[2, 5] = bad
    before = copy.deepcopy(model.state_dict())
    for method in ("magnitude", "wanda"):
        with pytest.raises(ModelLoadError, match=re.escape(f"model.layers.1.mlp.up_proj: 2 of its {W.numel()} weights "
                                                       "are inf or NaN (a broken checkpoint?); refusing to prune it")):
            prune(model, PruneConfig(method=method, sparsity=0.5, batch_size=4), calib_ids, progress=False)
        for k, v in model.state_dict().items():
            torch.testing.assert_close(v, before[k], rtol=0, atol=0, equal_nan=True)
    # a layer left out of the plan is not looked at
    prune(model, PruneConfig(method="magnitude", sparsity=0.5, exclude=("up_proj",)), progress=False)


def test_finite_weights_whose_sum_overflows_are_not_refused():
    from secateurs.models.arch import check_finite as _check_finite

    W = torch.full((4, 8), 3e38)  # every weight finite, their sum is not
    assert not torch.isfinite(W.sum())
    _check_finite("w", W)  # no error
    W[1, 2] = float("-inf")
    with pytest.raises(ModelLoadError, match=r"^w: 1 of its 32 weights are inf or NaN"):
        _check_finite("w", W)
    _check_finite("w", torch.empty(4, 8, device="meta"))  # offloaded weights are not read


# ----------------------------------------------------------------------------- walk checkpoints


def _first_block(model):
    return find_blocks(model)[1][0]


def _four_blocks(family: str = "llama"):
    from conftest import tiny_config

    fields = tiny_config(family).to_dict()
    fields.pop("layer_types", None)  # per-layer attention kinds: derived again for four layers
    fields["n_layer" if "n_layer" in fields else "num_hidden_layers"] = 4
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(type(tiny_config(family))(**fields)).eval()


@pytest.mark.parametrize("method, every, saved", [("wanda", 1, [0, 1]), ("sparsegpt", 2, [1])])
def test_a_walk_resumed_from_its_checkpoint_ends_identical(family, calib_ids, tmp_path, monkeypatch, method, every,
                                                           saved):
    from secateurs.engine import WalkCheckpoint

    config = PruneConfig(method=method, sparsity=0.5, batch_size=2)  # sparsegpt: true-sequential, its default
    whole = _four_blocks(family)
    uninterrupted = prune(whole, config, calib_ids, progress=False)

    saves, real_save = [], WalkCheckpoint.save

    def save_then_die(self, block, *args):  # killed once the state after block 1 is on the disk
        real_save(self, block, *args)
        saves.append(block)
        if block == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(WalkCheckpoint, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        prune(_four_blocks(family), config, calib_ids, progress=False,
              checkpoint=WalkCheckpoint(tmp_path / "walk", {"model": "tiny"}, every=every))
    monkeypatch.undo()
    folder = tmp_path / "walk"
    assert saves == saved and WalkCheckpoint(folder).saved_block == 1
    assert sorted(p.name for p in folder.iterdir()) == ["block-000.safetensors", "block-001.safetensors",
                                                      "hidden-001.safetensors", "walk.json"]

    walked, real_visit = [], sequential._visit_at_once if method == "wanda" else sequential._visit_true_sequential
    monkeypatch.setattr(sequential, real_visit.__name__, lambda step, job: walked.append(step.index) or real_visit(step, job))
    model = _four_blocks(family)
    resumed = prune(model, config, calib_ids, progress=False,
                    checkpoint=WalkCheckpoint(folder, {"model": "tiny"}, every=every))
    assert walked == [2, 3]  # blocks 0 and 1 came from the checkpoint
    a, b = whole.state_dict(), model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.layers == uninterrupted.layers and len(resumed.layers) == 4 * len(find_linears(_first_block(model)))


def test_a_walk_checkpoint_of_another_run_or_setting_is_refused(calib_ids, tmp_path):
    from secateurs.engine import WalkCheckpoint

    folder = tmp_path / "walk"
    config = PruneConfig(method="wanda", sparsity=0.5, batch_size=2)
    checkpoint = WalkCheckpoint(folder, {"model": "tiny"})
    checkpoint.start(config, calib_ids, torch.float32)
    checkpoint.save(0, find_blocks(_four_blocks())[1], [], [torch.zeros(2, 32, 64)], 1.0)
    for run, cfg, ids, differ in [({"model": "tiny"}, config.override(sparsity=0.6), calib_ids, "config"),
                                  ({"model": "tiny"}, config, calib_ids[:, :16], "calibration"),
                                  ({"model": "other"}, config, calib_ids, "model"),
                                  ({"model": "tiny"}, config, calib_ids, "dtype")]:
        model = _four_blocks().to(torch.bfloat16 if differ == "dtype" else torch.float32)
        with pytest.raises(ConfigError, match=rf"holds the walk of another run \({differ} differ\)"):
            prune(model, cfg, ids, progress=False, checkpoint=WalkCheckpoint(folder, run))
    for cfg, message in [(PruneConfig(method="magnitude"), "method magnitude does not walk the blocks"),
                         (PruneConfig(method="wanda", allocation="global", propagate="dense"), "allocation=global ranks every layer"),
                         ([config, config], "one config, not a recipe of 2 stages")]:
        with pytest.raises(ConfigError, match=message):
            prune(_four_blocks(), cfg, calib_ids, progress=False, checkpoint=WalkCheckpoint(tmp_path / "x"))
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pattern, sparsity", [("unstructured", 0.5), ("2:4", None)])
def test_pruning_a_few_rows_at_a_time_is_bit_identical(calib_ids, monkeypatch, dtype, pattern, sparsity):
    """Wanda's rows are independent: the engine prunes each matrix a chunk of rows at a time in the model's dtype
    (5 rows here), with the same weights, masks and records as the whole matrix in float32."""
    from secateurs.methods.wanda import Wanda

    def run(row_local):
        monkeypatch.setattr(Wanda, "row_local", row_local)
        model = tiny_model("llama").to(dtype)
        result = prune(model, PruneConfig(method="wanda", pattern=pattern, sparsity=sparsity, batch_size=4),
                       calib_ids, progress=False)
        return model.state_dict(), [(r.name, r.pruned, r.zeros) for r in result.layers]

    monkeypatch.setattr(sequential, "ROWS_AT_ONCE", 5 * 64)  # the tiny model's inputs are 64 or 128 wide
    chunks, original = [], sequential.prune_rows
    monkeypatch.setattr(sequential, "prune_rows", lambda *a: chunks.append(a[1].shape) or original(*a))
    chunked = run(True)
    assert len(chunks) == len(chunked[1])  # every matrix took the chunked path
    whole = run(False)
    assert len(chunks) == len(chunked[1])  # and none did here
    assert chunked[1] == whole[1]
    assert all(torch.equal(chunked[0][k].view(torch.uint8), whole[0][k].view(torch.uint8)) for k in whole[0])
