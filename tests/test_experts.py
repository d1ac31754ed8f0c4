"""A mixture of experts' fused experts pruned as weights: per-expert statistics from the routed tokens (an
oracle computed by hand), every method and pattern, honest counts, bounded memory, and checkpoints that load
in plain transformers."""

import json

import pytest
import torch
import transformers as tf
from safetensors.torch import save_file

from conftest import MOE_FAMILIES, VOCAB, tiny_moe
from secateurs import ConfigError, PruneConfig, prune
from secateurs.errors import ArchitectureError
from secateurs.engine import sequential
from secateurs.engine.sequential import Pass, plan_passes
from secateurs.models.arch import role_of

CALIB = dict(calib_samples=8, calib_seqlen=32, batch_size=4)


@pytest.fixture
def ids():
    return torch.randint(0, VOCAB, (8, 32), generator=torch.Generator().manual_seed(1))


def moe_blocks(model):
    return [(i, b.mlp) for i, b in enumerate(model.model.layers) if hasattr(b.mlp, "experts")]


def expert_slices(model):
    """Every expert's gate, up and down matrix, read straight from the fused tensors."""
    out = {}
    for i, mlp in moe_blocks(model):
        gate_up, down = mlp.experts.gate_up_proj.data, mlp.experts.down_proj.data
        inter = down.shape[-1]
        for e in range(gate_up.shape[0]):
            out[f"{i}.{e}.gate"], out[f"{i}.{e}.up"] = gate_up[e, :inter], gate_up[e, inter:]
            out[f"{i}.{e}.down"] = down[e]
    return out


def routed_inputs(model, ids, experts):
    """``(hidden, top_k_index, top_k_weights)`` of every calibration batch at ``experts``, in a plain forward."""
    seen = []
    handle = experts.register_forward_pre_hook(lambda m, args: seen.append([a.detach().clone() for a in args]))
    with torch.no_grad():
        for start in range(0, len(ids), CALIB["batch_size"]):
            model(ids[start:start + CALIB["batch_size"]])
    handle.remove()
    return seen


def scope_zeros(model) -> float:
    """Zeros / total over every 2-D (or larger) weight of the blocks, counted directly."""
    zeros = total = 0
    for p in model.model.layers.parameters():
        if p.dim() >= 2:
            zeros += int((p == 0).sum())
            total += p.numel()
    return zeros / total


@pytest.mark.parametrize("family", MOE_FAMILIES)
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_every_expert_matrix_and_projection_is_pruned_to_the_target(family, method, ids):
    model = tiny_moe(family)
    keys = set(model.state_dict())
    routers = {n: p.clone() for n, p in model.named_parameters() if n.endswith("gate.weight")}
    result = prune(model, PruneConfig(method=method, **CALIB), ids, progress=False)
    for name, W in expert_slices(model).items():
        assert (W == 0).float().mean().item() == pytest.approx(0.5), name
    for name, p in model.model.layers.named_parameters():
        if p.dim() == 2 and "proj" in name:
            assert (p == 0).float().mean().item() == pytest.approx(0.5), name
    assert all(torch.equal(p, routers[n]) for n, p in model.named_parameters() if n in routers)  # never pruned
    assert result.sparsity == pytest.approx(scope_zeros(model), abs=1e-12)
    assert 0.49 < result.sparsity < 0.5  # the routers, never pruned, are counted
    assert set(result.untouched) == set(routers)
    assert result.experts == {"matrices": 3 * 4 * len(moe_blocks(model)), "by_magnitude": 0, "min_tokens": 16}
    # the model is given back as transformers made it
    assert set(model.state_dict()) == keys
    assert all("forward" not in vars(mlp.experts) and not hasattr(mlp.experts, "0") for _, mlp in moe_blocks(model))


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_a_pruned_mixture_saves_and_loads_in_plain_transformers(family, ids, tmp_path):
    model = tiny_moe(family)
    dense = {n: p.clone() for n, p in model.named_parameters()}
    prune(model, PruneConfig(method="wanda", pattern="2:4", **CALIB), ids, progress=False)
    model.save_pretrained(tmp_path)
    loaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    for name, p in loaded.named_parameters():
        if not any(k in name for k in ("proj", "experts")):  # norms, embeddings, head, routers: as they were
            assert torch.equal(p, dense[name]), name
    for name, W in expert_slices(loaded).items():
        assert int((W.reshape(W.shape[0], -1, 4) != 0).sum(-1).max()) <= 2, name


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_per_expert_statistics_are_those_of_the_tokens_routed_to_it(family, ids, monkeypatch):
    """The oracle: each expert's X^T X, from the tokens its router sent it (down_proj: weighted by the routing
    weight), computed here from the experts' own inputs in a plain forward of the dense model."""
    model = tiny_moe(family)
    first, mlp = moe_blocks(model)[0]
    experts = mlp.experts
    seen = routed_inputs(model, ids, experts)
    gate_up, down = experts.gate_up_proj.detach().clone(), experts.down_proj.detach().clone()

    got = {}
    take = sequential.WeightJob.stats

    def spy(self, step, names, observer):
        stats = take(self, step, names, observer)
        got[names[0]] = (stats.tokens, stats.hessian.clone())
        return stats

    monkeypatch.setattr(sequential.WeightJob, "stats", spy)
    prune(model, PruneConfig(method="sparsegpt", true_sequential=False, include=(rf"layers\.{first}\.mlp\.experts",),
                             **CALIB), ids, progress=False)
    prefix = f"model.layers.{first}.mlp.experts"
    for e in range(gate_up.shape[0]):
        H_in, H_down, tokens = torch.zeros(64, 64), torch.zeros(down.shape[-1], down.shape[-1]), 0
        for hidden, index, weights in seen:
            token, slot = torch.where(index == e)
            x = hidden[token]
            h = experts._apply_gate(x @ gate_up[e].t()) * weights[token, slot, None]
            H_in += x.t() @ x
            H_down += h.t() @ h
            tokens += len(token)
        assert got[f"{prefix}.{e}.gate_proj"][0] == tokens > 0
        torch.testing.assert_close(got[f"{prefix}.{e}.gate_proj"][1], H_in, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got[f"{prefix}.{e}.down_proj"][1], H_down, rtol=1e-4, atol=1e-4)


def test_an_expert_routed_too_few_tokens_is_pruned_by_magnitude(ids, monkeypatch, caplog):
    monkeypatch.setattr(sequential, "MIN_EXPERT_TOKENS", 10**9)  # every expert is "rare"
    wanda, magnitude = tiny_moe("mixtral"), tiny_moe("mixtral")
    result = prune(wanda, PruneConfig(method="wanda", **CALIB), ids, progress=False)
    prune(magnitude, PruneConfig(method="magnitude", group="row", include=("experts",)), None, progress=False)
    for (name, a), b in zip(expert_slices(wanda).items(), expert_slices(magnitude).values()):
        assert torch.equal(a, b), name
    assert result.experts["by_magnitude"] == result.experts["matrices"] == 24
    assert "pruned by magnitude" in caplog.text
    assert all(r.routed_tokens is not None for r in result.layers if ".experts." in r.name)


@pytest.mark.parametrize("true_sequential", [False, True])
def test_statistics_split_over_many_passes_give_the_same_model(true_sequential, ids, monkeypatch):
    one = tiny_moe("qwen2moe")
    cfg = PruneConfig(method="sparsegpt", true_sequential=true_sequential, **CALIB)
    prune(one, cfg, ids, progress=False)
    monkeypatch.setattr(sequential, "EXPERT_STATS_BYTES", 1)  # one expert's statistics at a time
    many = tiny_moe("qwen2moe")
    prune(many, cfg, ids, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(one.state_dict().values(), many.state_dict().values()))


def test_passes_hold_whole_experts_within_the_budget():
    groups = [["q", "k", "v"], ["o"], ["e0.g", "e0.u"], ["e0.d"], ["e1.g", "e1.u"], ["e1.d"], ["s"]]

    def expert(g):
        return (g[0][:2], 0 if g[0][-1] in "gu" else 1) if g[0].startswith("e") else None

    size = {"q": 1, "o": 1, "s": 1, "e0.g": 4, "e0.d": 2, "e1.g": 4, "e1.d": 2}
    plan = lambda seq, budget: plan_passes(groups, expert, lambda g: size[g[0]], seq, budget)  # noqa: E731
    assert plan(False, 100) == [Pass(groups, groups[2:6] + [groups[0], groups[1], groups[6]])]
    e0, e1 = groups[2:4], groups[4:6]
    assert plan(False, 6) == [Pass(groups[:4] + [groups[6]], e0), Pass(e1, e1 + [groups[0], groups[1], groups[6]])]
    assert plan(True, 100) == [Pass([g], [g]) for g in groups[:2]] + [
        Pass([groups[2], groups[4]], [groups[2], groups[4]]), Pass([groups[3], groups[5]], [groups[3], groups[5]]),
        Pass([groups[6]], [groups[6]])]
    assert [p.observe for p in plan(True, 4)][2:6] == [[groups[2]], [groups[4]], [groups[3], groups[5]], [groups[6]]]


def test_experts_computing_something_else_are_refused_before_any_weight_changes(ids):
    model = tiny_moe("mixtral")
    experts = model.model.layers[0].mlp.experts
    cls = type(experts)

    def doubled(self, hidden_states, top_k_index, top_k_weights):
        return 2 * cls.forward(self, hidden_states, top_k_index, top_k_weights)

    experts.__class__ = type("DoubledExperts", (cls,), {"forward": doubled})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ArchitectureError, match=r"experts compute something other.*--exclude experts"):
        prune(model, PruneConfig(method="wanda", **CALIB), ids, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert "forward" not in vars(experts)


def test_a_scope_of_routers_only_and_quantized_experts_are_refused(ids):
    model = tiny_moe("mixtral")
    with pytest.raises(ConfigError, match="only routers"):
        prune(model, PruneConfig(method="wanda", include=(r"mlp\.gate$",), **CALIB), ids, progress=False)
    with pytest.raises(ConfigError, match="experts.*--exclude experts"):
        prune(model, PruneConfig(method="wanda", quant="int8", group_size=32, **CALIB), ids, progress=False)
    assert all("forward" not in vars(mlp.experts) for _, mlp in moe_blocks(model))


def test_a_streamed_prune_of_fused_experts_equals_the_prune_in_memory(ids, tmp_path):
    from secateurs.api import prune_streamed

    model = tiny_moe("qwen3moe")
    (tmp_path / "in").mkdir()
    save_file(model.state_dict(), tmp_path / "in" / "model.safetensors", metadata={"format": "pt"})
    model.config.save_pretrained(tmp_path / "in")
    cfg = PruneConfig(method="sparsegpt", **CALIB)
    result = prune_streamed(tmp_path / "in", cfg, ids, tmp_path / "out", progress=False)
    prune(model, cfg, ids, progress=False)
    streamed = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), streamed.state_dict().values()))
    assert result.experts["matrices"] == 24 and result.sparsity == pytest.approx(scope_zeros(streamed), abs=1e-12)


def test_the_cli_prunes_a_mixtral_folder_dense_and_compressed(tmp_path, capsys, tiny_dir, monkeypatch):
    from secateurs.cli import main
    from secateurs.models.load import load_model

    monkeypatch.setenv("SECATEURS_CACHE", str(tmp_path / "cache"))
    tokenizer = tf.AutoTokenizer.from_pretrained(tiny_dir / "model")
    tiny_moe("mixtral", vocab=len(tokenizer)).save_pretrained(tmp_path / "moe")
    tokenizer.save_pretrained(tmp_path / "moe")
    flags = ["--model", str(tmp_path / "moe"), "--quiet", "--calib-data", str(tiny_dir / "train.txt"),
             "--calib-samples", "4", "--calib-seqlen", "32", "--no-eval", "--method", "wanda"]
    assert main(["prune", *flags, "--output", str(tmp_path / "d"), "--report", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    dense = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "d")
    assert report["sparsity"] == pytest.approx(scope_zeros(dense), abs=1e-12) and report["experts"]["matrices"] == 24
    assert f"24 expert matrices, {report['experts']['by_magnitude']} of them pruned by magnitude" in \
        capsys.readouterr().out
    assert main(["prune", *flags, "--save-format", "sparse", "--output", str(tmp_path / "s")]) == 0
    assert report["streamed"] is True  # converted once into the cache, then streamed: the experts stay fused
    encoded = json.loads((tmp_path / "s" / "config.json").read_text())["secateurs_sparsity"]["tensors"]
    assert {n for n in encoded if ".experts." in n} == {f"model.layers.{i}.mlp.experts.{p}" for i in range(2)
                                                        for p in ("gate_up_proj", "down_proj")}
    packed = load_model(str(tmp_path / "s"))[0]
    assert all(torch.equal(a, b) for a, b in zip(dense.state_dict().values(), packed.state_dict().values()))
    # loaded whole, saved by transformers one tensor per expert (Mixtral: experts.0.w1), compressed under those names
    assert main(["prune", *flags, "--no-stream", "--save-format", "sparse", "--output", str(tmp_path / "w")]) == 0
    encoded = json.loads((tmp_path / "w" / "config.json").read_text())["secateurs_sparsity"]["tensors"]
    assert sum(".experts." in n and n.endswith((".w1.weight", ".w2.weight", ".w3.weight")) for n in encoded) == 24
    whole = load_model(str(tmp_path / "w"))[0]
    assert all(torch.equal(a, b) for a, b in zip(dense.state_dict().values(), whole.state_dict().values()))


MORE = {  # other families with experts in transformers' standard fused layout (tiny configs; first block dense
    # where the family has first_k_dense_replace)
    "deepseek_v2": dict(intermediate_size=128, moe_intermediate_size=64, n_routed_experts=4, n_shared_experts=1,
                        first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8,
                        qk_nope_head_dim=8, v_head_dim=16),
    "deepseek_v3": dict(intermediate_size=128, moe_intermediate_size=64, n_routed_experts=4, n_shared_experts=1,
                        first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8,
                        qk_nope_head_dim=8, v_head_dim=16, n_group=1, topk_group=1),
    "glm4_moe": dict(intermediate_size=128, moe_intermediate_size=64, n_routed_experts=4, n_shared_experts=1,
                     first_k_dense_replace=1, head_dim=16),
    "dots1": dict(intermediate_size=128, moe_intermediate_size=64, n_routed_experts=4, n_shared_experts=1,
                  first_k_dense_replace=1, head_dim=16),
    "ernie4_5_moe": dict(intermediate_size=128, moe_intermediate_size=64, moe_num_experts=4, moe_k=2),
    "phimoe": dict(intermediate_size=128, num_local_experts=4),
    "granitemoe": dict(intermediate_size=128, num_local_experts=4),
    "minimax": dict(intermediate_size=128, num_local_experts=4, head_dim=16),
    "jamba": dict(intermediate_size=128, num_experts=4, expert_layer_period=1, expert_layer_offset=0,
                  attn_layer_period=1, attn_layer_offset=0),
    "qwen3_next": dict(intermediate_size=128, moe_intermediate_size=64, num_experts=4, head_dim=16,
                       shared_expert_intermediate_size=64, linear_num_key_heads=2, linear_num_value_heads=4,
                       linear_key_head_dim=8, linear_value_head_dim=8,
                       layer_types=["linear_attention", "full_attention"]),
}


@pytest.mark.parametrize("family", sorted(MORE))
def test_other_families_with_fused_experts_are_pruned_too(family, ids):
    torch.manual_seed(0)
    config = tf.AutoConfig.for_model(family, vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                     num_experts_per_tok=2, **MORE[family])
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    result = prune(model, PruneConfig(method="wanda", allow_partial=True, **CALIB), ids, progress=False)
    fused = [m for m in model.modules() if hasattr(m, "gate_up_proj") and getattr(m, "gate_up_proj").dim() == 3]
    assert fused and result.experts["matrices"] == 3 * sum(m.gate_up_proj.shape[0] for m in fused)
    for m in fused:
        for W in (m.gate_up_proj, m.down_proj):
            assert (W == 0).float().mean().item() == pytest.approx(0.5)
    assert result.sparsity == pytest.approx(scope_zeros(model), abs=1e-12)


# ------------------------------------------------------------------------------------------ removing experts


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_removing_experts_keeps_the_best_and_loads_in_plain_transformers_with_fewer(family, ids, tmp_path):
    from secateurs import StructuredConfig

    model = tiny_moe(family)
    first, mlp = moe_blocks(model)[0]
    gate_up, down = mlp.experts.gate_up_proj.detach().clone(), mlp.experts.down_proj.detach().clone()
    router = mlp.gate.weight.detach().clone()
    # REAP by hand: mean over the tokens routed to e of g_e(t) * ||f_e(t)||
    reap = []
    for e in range(4):
        total, tokens = 0.0, 0
        for hidden, index, weights in routed_inputs(model, ids, mlp.experts):
            token, slot = torch.where(index == e)
            f = mlp.experts._apply_gate(hidden[token] @ gate_up[e].t()) @ down[e].t()
            total += float((weights[token, slot] * f.norm(dim=-1)).sum())
            tokens += len(token)
        reap.append(total / max(tokens, 1))
    keep = sorted(sorted(range(4), key=lambda e: -reap[e])[:2])

    result = prune(model, StructuredConfig(method="experts", count=2, **CALIB), ids, progress=False)
    record = next(r for r in result.structured if r.block == first)
    assert (record.before, record.after, record.removed) == (4, 2, sorted(set(range(4)) - set(keep)))
    assert torch.equal(mlp.experts.gate_up_proj, gate_up[keep]) and torch.equal(mlp.experts.down_proj, down[keep])
    assert torch.equal(mlp.gate.weight, router[keep])
    model.save_pretrained(tmp_path)
    loaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert all(m.experts.gate_up_proj.shape[0] == 2 for _, m in moe_blocks(loaded))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_removing_experts_by_frequency_drops_the_least_chosen(ids):
    from secateurs import StructuredConfig

    model = tiny_moe("olmoe")
    first, mlp = moe_blocks(model)[0]
    counts = torch.zeros(4)
    for _, index, _ in routed_inputs(model, ids, mlp.experts):
        counts += torch.bincount(index.flatten(), minlength=4)
    result = prune(model, StructuredConfig(method="experts", ratio=0.25, score="frequency", **CALIB), ids,
                   progress=False)
    assert result.structured[0].removed == [int(torch.argmin(counts))]
    assert model.config.num_experts == 3


@pytest.mark.parametrize("bad, match", [
    (dict(count=3), "leaves 1, fewer than the 2 each token is routed to"),
    (dict(count=4), "leaves 0"),
    (dict(ratio=0.1), "removes none"),
])
def test_expert_removal_that_leaves_too_few_is_refused_before_any_change(bad, match, ids):
    from secateurs import StructuredConfig

    model = tiny_moe("mixtral")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=match):
        prune(model, StructuredConfig(method="experts", **bad, **CALIB), ids, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_expert_removal_on_a_dense_model_or_with_wrong_options_is_refused(ids):
    from conftest import tiny_model
    from secateurs import StructuredConfig

    with pytest.raises(ConfigError, match="mixture of experts"):
        prune(tiny_model("llama"), StructuredConfig(method="experts", count=1, **CALIB), ids, progress=False)
    with pytest.raises(ConfigError, match="score 'bi' is not offered for experts"):
        StructuredConfig(method="experts", count=1, score="bi")
    with pytest.raises(ConfigError, match="allocation uniform"):
        StructuredConfig(method="experts", ratio=0.5, allocation="global")


def test_the_cli_removes_experts(tmp_path, tiny_dir, monkeypatch):
    from secateurs.cli import main

    monkeypatch.setenv("SECATEURS_CACHE", str(tmp_path / "cache"))
    tokenizer = tf.AutoTokenizer.from_pretrained(tiny_dir / "model")
    tiny_moe("qwen3moe", vocab=len(tokenizer)).save_pretrained(tmp_path / "moe")
    tokenizer.save_pretrained(tmp_path / "moe")
    assert main(["prune", "--model", str(tmp_path / "moe"), "--quiet", "--calib-data", str(tiny_dir / "train.txt"),
                 "--calib-samples", "4", "--calib-seqlen", "32", "--no-eval", "--method", "experts",
                 "--remove-per-layer", "1", "--output", str(tmp_path / "o"), "--report", str(tmp_path / "r.json")]) == 0
    loaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "o")
    assert loaded.config.num_experts == 3 and loaded.model.layers[1].mlp.experts.down_proj.shape[0] == 3
    report = json.loads((tmp_path / "r.json").read_text())
    assert [r["after"] for r in report["structured"]] == [3, 3]


def test_fine_tuning_holds_the_experts_zeros(ids):
    from secateurs.training import TrainConfig, train

    model = tiny_moe("mixtral")
    prune(model, PruneConfig(method="wanda", **CALIB), ids, progress=False)
    zeros = {n: p == 0 for n, p in model.named_parameters() if p.dim() >= 2 and (p == 0).any()}
    assert any("experts" in n for n in zeros)
    before = {n: p.clone() for n, p in model.named_parameters()}
    train(model, ids.flatten(), TrainConfig(steps=3, batch_size=2, seqlen=16, lr=1e-2), progress=False)
    for n, p in model.named_parameters():
        if n in zeros:
            assert torch.equal(p == 0, zeros[n]), n  # no pruned weight came back, none kept was zeroed
    assert not torch.equal(before["model.layers.0.mlp.experts.down_proj"],
                           model.get_parameter("model.layers.0.mlp.experts.down_proj"))  # the experts did train


# ------------------------------------------------------------------ checkpoints saved one tensor per expert


@pytest.mark.parametrize("family", ["mixtral", "qwen2moe"])
def test_a_mixture_saved_by_transformers_is_converted_once_and_streamed(family, ids, tmp_path, monkeypatch):
    from secateurs.api import prune_streamed
    from secateurs.models.load import streamable
    from secateurs.models.stream import foreign_names

    monkeypatch.setenv("SECATEURS_CACHE", str(tmp_path / "cache"))
    model = tiny_moe(family)
    model.save_pretrained(tmp_path / "moe")
    assert any(".experts.0." in n for n in foreign_names(tmp_path / "moe"))  # one tensor per expert
    cached = streamable(tmp_path / "moe")
    assert cached is not None and cached.is_relative_to(tmp_path / "cache") and foreign_names(cached) == []
    stamp = [(f.name, f.stat().st_mtime_ns) for f in sorted(cached.iterdir())]
    assert streamable(tmp_path / "moe") == cached and stamp == [(f.name, f.stat().st_mtime_ns)
                                                                for f in sorted(cached.iterdir())]  # made once
    again = tf.AutoModelForCausalLM.from_pretrained(cached)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    cfg = PruneConfig(method="sparsegpt", **CALIB)
    prune_streamed(cached, cfg, ids, tmp_path / "out", progress=False)
    prune(model, cfg, ids, progress=False)
    streamed = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), streamed.state_dict().values()))


def test_a_layout_the_conversion_does_not_know_is_loaded_whole(tmp_path, monkeypatch):
    import transformers.conversion_mapping as mapping

    from secateurs.models.load import streamable

    monkeypatch.setenv("SECATEURS_CACHE", str(tmp_path / "cache"))
    tiny_moe("qwen3moe").save_pretrained(tmp_path / "moe")
    real = mapping.get_model_conversion_mapping

    def with_an_unknown_operation(model, *args, **kwargs):
        rules = real(model, *args, **kwargs)
        for rule in rules:
            if getattr(rule, "operations", None):
                rule.operations = [type("Transpose", (), {"dim": 0})()] + list(rule.operations)
        return rules

    monkeypatch.setattr(mapping, "get_model_conversion_mapping", with_an_unknown_operation)
    assert streamable(tmp_path / "moe") is None and not (tmp_path / "cache").exists()


def test_a_cache_without_room_loads_the_mixture_whole(tmp_path, monkeypatch, free_space, caplog):
    from secateurs.models.load import streamable

    monkeypatch.setenv("SECATEURS_CACHE", str(tmp_path / "cache"))
    tiny_moe("olmoe").save_pretrained(tmp_path / "moe")
    free_space(1000)
    assert streamable(tmp_path / "moe") is None and "loaded whole instead" in caplog.text
