"""Structured pruning: exact scores, cases where the unit to remove is known by construction, surgery that
keeps every family loadable with plain transformers, GQA consistency, repairs, CLI errors."""

import json
import math

import pytest
import torch
import transformers as tf

from conftest import cli_args, tiny_model
from secateurs import StructuredConfig, load, prune
from secateurs.cli import main
from secateurs.config import ConfigError
from secateurs.models import ArchitectureError, find_blocks
from secateurs.structured import scores as S
from secateurs.structured.engine import allocate_global, head_units, uniform_count
from secateurs.structured.units import find_attention, find_mlp

X = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))


def logits(model):
    with torch.no_grad():
        return model(X).logits


# ----------------------------------------------------------------------------- pure math


def test_channel_scores_by_hand():
    W_out = torch.tensor([[1.0, -2.0, 0.0], [3.0, 0.0, 1.0]])  # (hidden 2, width 3)
    W_in = torch.tensor([[1.0, 1.0], [0.0, 2.0], [2.0, 0.0]])  # (width 3, hidden 2)
    st = S.ChannelStats()
    st.add(torch.tensor([[1.0, 2.0, 0.0], [3.0, 2.0, 4.0]]))  # 2 tokens
    assert torch.allclose(S.channel_scores("magnitude", W_out, [W_in], None).float(),
                          torch.tensor([math.sqrt(1 + 9 + 1 + 1), math.sqrt(4 + 4), math.sqrt(1 + 4)]))
    # wanda: sum_i |W_ij| * ||x_j||: ||x|| = (sqrt 10, sqrt 8, 4)
    assert torch.allclose(S.channel_scores("wanda", W_out, [], st).float(),
                          torch.tensor([4 * math.sqrt(10), 2 * math.sqrt(8), 1 * 4.0]))
    # fluctuation: unbiased variance (2, 0, 8) times ||W[:, j]||^2 (10, 4, 1)
    assert torch.allclose(S.channel_scores("fluctuation", W_out, [], st).float(), torch.tensor([20.0, 0.0, 8.0]))
    assert torch.allclose(st.mean.float(), torch.tensor([2.0, 2.0, 2.0]))
    with pytest.raises(ValueError, match="needs calibration"):
        S.channel_scores("wanda", W_out, [], None)


def test_heads_ties_and_bias_compensation():
    assert S.head_scores(torch.arange(6.0), 3).tolist() == [3.0, 12.0]
    assert S.lowest(torch.tensor([2.0, 1.0, 1.0, 0.5]), 2) == [1, 3]  # tie 1.0/1.0 goes to the lower index
    W = torch.tensor([[1.0, 2.0, 3.0], [0.0, 1.0, -1.0]])
    assert S.bias_compensation(W, torch.tensor([5.0, 7.0, 11.0]), [0, 2]).tolist() == [38.0, -11.0]


def test_least_squares_refit_recovers_a_linearly_dependent_channel():
    """If channel 2 = channel 0 + channel 1 on every token, dropping it loses nothing after the refit."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 2, generator=g, dtype=torch.float64)
    x = torch.cat([x, x.sum(1, keepdim=True)], 1)  # (tokens, 3)
    W = torch.randn(4, 3, generator=g, dtype=torch.float64)
    st = S.ChannelStats()
    st.add(x, gram=True)
    W2 = S.least_squares_refit(W, st.gram, [0, 1], percdamp=1e-9)
    assert torch.allclose(x[:, :2] @ W2.t(), x @ W.t(), atol=1e-5)
    assert not torch.allclose(x[:, :2] @ W[:, :2].t(), x @ W.t(), atol=1e-1)  # without it, a real loss


def test_block_influence_and_angular_distance():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # token 1 unchanged, token 2 turned by 90 degrees
    cos = S.cosine_per_token(a, b)
    assert cos.tolist() == [1.0, 0.0]
    assert S.block_influence(cos.sum().reshape(1), 2).item() == pytest.approx(0.5)
    assert S.angular_distance(cos).tolist() == pytest.approx([0.0, 0.5])
    assert S.blocks_to_remove("bi", torch.tensor([0.3, 0.1, 0.2, 0.05]), 2) == [1, 3]
    assert S.blocks_to_remove("angular", torch.tensor([0.3, 0.1, 0.2]), 2) == [1, 2]


def test_head_units_keep_gqa_valid():
    class Att:  # 6 query heads over 2 KV heads (3 per group)
        heads, kv_heads = 6, 2

    scores = torch.tensor([5.0, 1.0, 3.0, 2.0, 9.0, 0.5])
    units, s = head_units(Att, scores, "per-group")
    # unit r = the r-th least important head of each group
    assert units == [([1, 5], []), ([2, 3], []), ([0, 4], [])] and s.tolist() == [1.5, 5.0, 14.0]
    units, s = head_units(Att, scores, "kv-groups")
    assert units == [([0, 1, 2], [0]), ([3, 4, 5], [1])] and s.tolist() == [9.0, 11.5]


def test_uniform_count_and_global_allocation():
    assert uniform_count(1536, 0.2, None, 1) == 307
    assert uniform_count(1536, 0.2, None, 64) == 1536 - 1216  # keeps 19 x 64
    assert uniform_count(10, None, 3, 1) == 3
    # layer 0's scores are flat except one outlier; layer 1 spreads evenly: z-scores decide
    counts = allocate_global([torch.tensor([1.0, 1.0, 1.0, 10.0]), torch.tensor([1.0, 2.0, 3.0, 4.0])], 0.5, 1, 1)
    assert counts == [3, 1] and sum(counts) == 4
    assert allocate_global([torch.arange(8.0), torch.arange(8.0)], 0.5, 4, 4) == [4, 4]


# ----------------------------------------------------------------------------- known by construction


def _llama():
    return tiny_model("llama")  # 2 blocks, hidden 64, MLP 128, 4 query heads over 2 KV heads of 16


@pytest.mark.parametrize("score", ["magnitude", "wanda", "fluctuation"])
def test_the_dead_channel_goes_first_and_nothing_changes(score, calib_ids):
    model = _llama()
    name, blocks = find_blocks(model)
    for i, block in enumerate(blocks):
        mlp = find_mlp(block, f"{name}.{i}.")
        with torch.no_grad():  # channel 5 writes nothing and reads nothing
            mlp.output[1].weight[:, 5] = 0
            for _, m in mlp.inputs:
                m.weight[5] = 0
    before = logits(model)
    result = prune(model, StructuredConfig(method="channels", count=1, score=score, bias_compensation=False,
                                           batch_size=4), calib_ids, progress=False)
    assert [r.removed for r in result.structured] == [[5], [5]]
    assert model.config.intermediate_size == 127
    assert torch.allclose(logits(model), before, atol=1e-5)


def test_the_silent_head_goes_first(calib_ids):
    model = _llama()
    name, blocks = find_blocks(model)
    for i, block in enumerate(blocks):
        att = find_attention(block, f"{name}.{i}.")
        with torch.no_grad():
            att.o[1].weight[:, 16:32] = 0  # query head 1 (group 0) contributes nothing
    before = logits(model)
    result = prune(model, StructuredConfig(method="heads", count=1, score="wanda", batch_size=4), calib_ids,
                   progress=False)
    assert [r.removed[0] for r in result.structured] == [1, 1]  # the other group loses its weakest head too
    assert [len(r.removed) for r in result.structured] == [2, 2]
    assert (model.config.num_attention_heads, model.config.num_key_value_heads, model.config.head_dim) == (2, 2, 16)
    att = find_attention(find_blocks(model)[1][0], f"{name}.0.")
    assert att.module.num_key_value_groups == 1
    assert logits(model).shape == before.shape


def test_kv_groups_mode_removes_whole_groups(calib_ids):
    model = _llama()
    prune(model, StructuredConfig(method="heads", count=1, gqa="kv-groups", score="wanda", batch_size=4), calib_ids,
          progress=False)
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (2, 1)
    att = find_attention(find_blocks(model)[1][1], "model.layers.1.")
    assert (att.heads, att.kv_heads, att.module.num_key_value_groups) == (2, 1, 2)


@pytest.mark.parametrize("score", ["bi", "angular"])
def test_an_identity_block_is_the_one_removed(score, calib_ids):
    """A block whose attention and MLP write nothing leaves the hidden states unchanged: BI = distance = 0."""
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.weight.zero_()
    before = logits(model)
    result = prune(model, StructuredConfig(method="blocks", count=1, score=score, batch_size=4), calib_ids,
                   progress=False)
    assert [r.block for r in result.structured] == [1]
    assert result.block_scores[1] == pytest.approx(0.0, abs=1e-6)
    assert min(result.block_scores) == result.block_scores[1]
    assert model.config.num_hidden_layers == 2
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
    assert torch.allclose(logits(model), before, atol=1e-5)
    with torch.no_grad():  # the KV cache is indexed by the renumbered layer_idx: generation works
        out = model.generate(X[:1, :4], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)


def test_bias_compensation_makes_a_constant_channel_free(calib_ids):
    """OPT's fc1 has a bias: a channel with zero weights outputs relu(b) on every token (variance 0).
    Fluctuation removes it, and folding its constant into fc2's bias keeps the outputs identical."""
    model = tiny_model("opt")
    for layer in model.model.decoder.layers:
        with torch.no_grad():
            layer.fc1.weight[7] = 0
            layer.fc1.bias[7] = 0.8
    before = logits(model)
    prune(model, StructuredConfig(method="channels", count=1, score="fluctuation", batch_size=4), calib_ids,
          progress=False)
    assert model.config.ffn_dim == 127
    assert torch.allclose(logits(model), before, atol=1e-5)
    model2 = tiny_model("opt")
    for layer in model2.model.decoder.layers:
        with torch.no_grad():
            layer.fc1.weight[7] = 0
            layer.fc1.bias[7] = 0.8
    prune(model2, StructuredConfig(method="channels", count=1, score="fluctuation", bias_compensation=False,
                                   batch_size=4), calib_ids, progress=False)
    assert not torch.allclose(logits(model2), before, atol=1e-3)  # without the repair the constant is lost


def test_bias_compensation_switches_llama_mlp_bias_on(calib_ids, tmp_path):
    model = _llama()
    prune(model, StructuredConfig(method="channels", ratio=0.25, score="fluctuation", batch_size=4), calib_ids,
          progress=False)
    assert model.config.mlp_bias is True and model.model.layers[0].mlp.down_proj.bias is not None
    model.save_pretrained(tmp_path)
    again = tf.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(logits(again), logits(model))


def test_refit_lowers_the_layer_error(calib_ids):
    """Same channels removed; the refit down projection reproduces the dense MLP output better."""
    from secateurs.engine import capture_inputs

    def mlp_error(refit):
        model = _llama()
        dense = _llama()
        prune(model, StructuredConfig(method="channels", ratio=0.5, score="wanda", refit=refit, batch_size=6),
              calib_ids, progress=False)
        _, blocks = find_blocks(dense)
        hidden, _ = capture_inputs(dense, blocks, calib_ids, 6)
        h = blocks[0].post_attention_layernorm(hidden[0])
        return float((model.model.layers[0].mlp(h) - dense.model.layers[0].mlp(h)).pow(2).sum())

    with torch.no_grad():
        assert mlp_error(True) < 0.7 * mlp_error(False)


# ----------------------------------------------------------------------------- every family stays loadable


@pytest.mark.parametrize("cfg", [dict(method="channels", ratio=0.25, score="wanda"),
                                 dict(method="channels", ratio=0.25, round_to=8, score="magnitude"),
                                 dict(method="blocks", count=1)])
def test_every_family_saves_and_loads_in_plain_transformers(family, cfg, calib_ids, tmp_path):
    model = tiny_model(family)
    params = sum(p.numel() for p in model.parameters())
    prune(model, StructuredConfig(**cfg, batch_size=4), calib_ids, progress=False)
    assert sum(p.numel() for p in model.parameters()) < params
    model.save_pretrained(tmp_path)
    again = tf.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(logits(again), logits(model))


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma", "gemma3", "phi"])
def test_heads_save_and_load_in_plain_transformers(family, calib_ids, tmp_path):
    model = tiny_model(family)
    heads = model.config.num_attention_heads
    prune(model, StructuredConfig(method="heads", count=1, score="wanda", batch_size=4), calib_ids, progress=False)
    assert model.config.num_attention_heads < heads
    model.save_pretrained(tmp_path)
    again = tf.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(logits(again), logits(model))


@pytest.mark.parametrize("family, message", [("gpt2", "fused q/k/v"), ("opt", "ties the head size")])
def test_heads_refused_where_the_config_cannot_say_it(family, message, calib_ids):
    model = tiny_model(family)
    before = logits(model)
    with pytest.raises(ArchitectureError, match=message):
        prune(model, StructuredConfig(method="heads", count=1, score="wanda", batch_size=4), calib_ids, progress=False)
    assert torch.equal(logits(model), before)  # refused before any weight changed


def test_non_uniform_widths_load_with_secateurs_only(calib_ids, tmp_path):
    model = tiny_model("gemma")
    prune(model, StructuredConfig(method="channels", ratio=0.3, allocation="global", score="wanda", batch_size=4),
          calib_ids, progress=False)
    widths = [find_mlp(b).width for b in model.model.layers]
    assert len(set(widths)) == 2 and sum(128 - w for w in widths) == round(0.3 * 256)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["secateurs_structure"]["mlp"] == widths
    with pytest.raises(Exception, match="size mismatch|mismatch"):
        tf.AutoModelForCausalLM.from_pretrained(tmp_path)  # plain transformers refuses; never loads wrong
    again, _ = load(tmp_path)
    assert torch.equal(logits(again), logits(model))


def test_config_errors():
    with pytest.raises(ConfigError, match="exactly one of ratio or count"):
        StructuredConfig(method="channels")
    with pytest.raises(ConfigError, match="ratio must be in"):
        StructuredConfig(method="heads", ratio=1.0)
    with pytest.raises(ConfigError, match="not offered"):
        StructuredConfig(method="blocks", count=1, score="wanda")
    with pytest.raises(ConfigError, match="choose one"):
        StructuredConfig(method="channels", ratio=0.2, refit=True, bias_compensation=True)
    with pytest.raises(ConfigError, match="give --ratio"):
        StructuredConfig(method="channels", count=3, allocation="global")


def test_removing_every_unit_is_refused(calib_ids):
    with pytest.raises(ValueError, match="remove every one"):
        prune(_llama(), StructuredConfig(method="heads", count=2, score="wanda", batch_size=4), calib_ids,
              progress=False)
    with pytest.raises(ValueError, match="cannot remove 2 of the model's 2 blocks"):
        prune(_llama(), StructuredConfig(method="blocks", count=2, batch_size=4), calib_ids, progress=False)


# ----------------------------------------------------------------------------- CLI


def test_cli_structured_prune_reports_size_and_speed(tiny_dir, tmp_path, capsys):
    out, report = tmp_path / "out", tmp_path / "r.json"
    assert main(["prune", *cli_args(tiny_dir, "--method", "channels", "--ratio", "0.25", "--round-to", "8"),
                 "--output", str(out), "--report", str(report)]) == 0
    r = json.loads(report.read_text())
    ss = r["size_speed"]
    assert ss["pruned"]["params"] < ss["dense"]["params"] and ss["pruned"]["disk_bytes"] < ss["dense"]["disk_bytes"]
    assert ss["pruned"]["params"] == r["total_params"]
    assert ss["ratios"]["prefill_speedup"] > 0 and len(ss["dense"]["prefill_tokens_per_s"]["runs"]) == 5
    assert [c["after"] for c in r["structured"]] == [96, 96]
    assert math.isfinite(r["perplexity"])
    again = tf.AutoModelForCausalLM.from_pretrained(out)
    assert again.config.intermediate_size == 96
    assert main(["prune", *cli_args(tiny_dir, "--remove-blocks", "1", "--no-speed"), "--output",
                 str(tmp_path / "b")]) == 0
    assert tf.AutoConfig.from_pretrained(tmp_path / "b").num_hidden_layers == 1


@pytest.mark.parametrize("extra, message", [
    (["--method", "channels", "--ratio", "1.0"], "ratio must be in"),
    (["--method", "heads", "--remove-per-layer", "2", "--score", "wanda"], "remove every one"),
    (["--remove-blocks", "2"], "cannot remove 2"),
    (["--method", "channels", "--remove-blocks", "1"], "--remove-blocks is for"),
    (["--method", "channels", "--ratio", "0.2", "--sparsity", "0.5"], "unknown config field"),
])
def test_cli_structured_errors(tiny_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    assert main(["prune", *cli_args(tiny_dir, *extra, "--no-speed"), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_cli_structured_cut_in_memory_checks_room_for_the_cut_model_before_measuring_it(tiny_dir, tmp_path, capsys,
                                                                              monkeypatch, free_space):
    from secateurs.eval import speed

    dense = tf.AutoModelForCausalLM.from_pretrained(tiny_dir / "model")
    removed = 2 * 3 * 64 * 32  # 2 blocks: gate, up and down each lose 32 of their 128 channels of width 64
    room = sum(p.numel() * p.element_size() for p in dense.parameters()) - 4 * removed + 16 * 2**20
    measured = []
    free_space(room - 1)  # one byte short of the cut model and its 16 MiB of extras
    monkeypatch.setattr(speed, "measure", lambda model: measured.append(1) or {})
    out, flags = tmp_path / "out", cli_args(tiny_dir, "--method", "channels", "--ratio", "0.25", "--round-to", "8",
                                            "--score", "magnitude", "--no-stream")  # no bias compensation
    capsys.readouterr()
    assert main(["prune", *flags, "--output", str(out)]) == 2
    printed = capsys.readouterr()
    assert "structured: 2 cuts" in printed.out and "pruned perplexity" not in printed.out
    assert printed.err.startswith(f"secateurs: error: output folder '{out}': saving the model needs ")
    assert measured == [1] and not out.exists()  # the dense model was measured; the cut one was not
    free_space(room)  # exactly enough for the cut model (the dense one is larger)
    assert main(["prune", *flags, "--no-speed", "--output", str(out)]) == 0
