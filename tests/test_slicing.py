"""SliceGPT: the rotation changes nothing, the slice is the original model confined to the kept directions, the
directions are the stream's principal ones, and the sliced model loads in plain transformers."""

import copy
import json

import pytest
import torch
import transformers as tf

from conftest import cli_args, tiny_model
from secateurs import StructuredConfig, prune
from secateurs.cli import main
from secateurs.errors import ArchitectureError, ConfigError
from secateurs.models import find_blocks
from secateurs.progress import Tracker
from secateurs import load
from secateurs.models import load_model
from secateurs.structured.slicing import (add_shortcuts, kept_width, principal_rotation, rotate_and_slice,
                                          stream_covariances)
from secateurs.structured.units import find_attention, find_mlp

SLICEABLE = ["llama", "qwen2", "mistral", "gemma"]


def _ids(seed=0, shape=(4, 16)):
    return torch.randint(0, 100, shape, generator=torch.Generator().manual_seed(seed))


def _rotation(model, calib_ids):
    return principal_rotation(sum(stream_covariances(model, calib_ids, 2, torch.device("cpu"), Tracker(show=False))))


def _confined(model, P):
    """The original model with its stream projected by ``P`` (d, d) wherever it is written: after the
    embeddings and after every attention and MLP output."""
    model = copy.deepcopy(model)
    _, blocks = find_blocks(model)

    def project_input(_m, args, kwargs):
        if args:
            return (args[0] @ P, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"] @ P}

    blocks[0].register_forward_pre_hook(project_input, with_kwargs=True)
    for block in blocks:
        for linear in (find_attention(block).o[1], find_mlp(block).output[1]):
            linear.register_forward_hook(lambda _m, _a, out: out @ P)
    return model


@pytest.mark.parametrize("family", SLICEABLE)
def test_rotating_without_slicing_changes_no_output(family, calib_ids):
    model = tiny_model(family).eval()
    before = model(_ids()).logits
    Q = _rotation(model, calib_ids)
    rotate_and_slice(model, Q, Q.shape[0])
    torch.testing.assert_close(model(_ids()).logits, before, atol=2e-6, rtol=0)


@pytest.mark.parametrize("family", SLICEABLE)
@pytest.mark.parametrize("width", [40, 16])
def test_the_sliced_model_is_the_original_confined_to_the_kept_directions(family, width, calib_ids):
    model = tiny_model(family).eval()
    Q = _rotation(model, calib_ids)
    Qs = Q[:, :width].float()
    want = _confined(model, Qs @ Qs.t())(_ids(1)).logits
    rotate_and_slice(model, Q, width)
    assert model.config.hidden_size == width and not model.config.tie_word_embeddings
    torch.testing.assert_close(model(_ids(1)).logits, want, atol=2e-6, rtol=0)


def test_the_directions_are_the_principal_ones_of_the_unit_tokens_every_norm_reads(calib_ids):
    model = tiny_model("llama").eval()
    _, blocks = find_blocks(model)
    seen = []
    norms = [m for b in blocks for m in (b.input_layernorm, b.post_attention_layernorm)] + [model.model.norm]
    hooks = [n.register_forward_pre_hook(lambda _m, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
             for n in norms]
    for i in range(0, len(calib_ids), 2):
        model(calib_ids[i:i + 2], use_cache=False)
    for h in hooks:
        h.remove()
    X = torch.cat(seen).double()
    U = X / X.norm(dim=1, keepdim=True)
    C = U.t() @ U
    got = stream_covariances(model, calib_ids, 2, torch.device("cpu"), Tracker(show=False))
    torch.testing.assert_close(sum(got), C)
    raw = stream_covariances(model, calib_ids, 2, torch.device("cpu"), Tracker(show=False), unit=False)
    torch.testing.assert_close(sum(raw), X.t() @ X)  # the paper's: tokens as they are
    assert len(got) == 2 * len(blocks) + 1
    Q = principal_rotation(C, damp=0.0)
    values = torch.linalg.eigvalsh(C).flip(0)
    torch.testing.assert_close(torch.diagonal(Q.t() @ C @ Q), values)  # each column an eigenvector, in order
    torch.testing.assert_close(Q.t() @ Q, torch.eye(len(Q), dtype=Q.dtype))


def test_kept_width_rounds_down_to_the_multiple():
    assert kept_width(576, 0.25, 1) == 432 and kept_width(576, 0.25, 64) == 384 and kept_width(64, 0.3, 8) == 40
    assert kept_width(576, 0.2, 1, heads=9) == 459 and kept_width(576, 0.2, 8, heads=9) == 432


@pytest.mark.parametrize("family", SLICEABLE)
def test_a_sliced_model_saves_and_loads_in_plain_transformers(family, calib_ids, tmp_path):
    model = tiny_model(family).eval()
    params = sum(p.numel() for p in model.parameters())
    result = prune(model, StructuredConfig(method="slicegpt", ratio=0.25, round_to=8, batch_size=2), calib_ids,
                   progress=False)
    assert [(r.kind, r.before, r.after) for r in result.structured] == [("hidden", 64, 48)] * 2
    assert sum(p.numel() for p in model.parameters()) < params
    model.save_pretrained(tmp_path)
    again = tf.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert again.config.hidden_size == 48
    assert torch.equal(again(_ids()).logits, model(_ids()).logits)


@pytest.mark.parametrize("family, message", [("opt", "slicegpt needs pre-norm blocks"),
                                             ("gpt2", "slicegpt needs pre-norm blocks"),
                                             ("phi", "slicegpt needs pre-norm blocks"),
                                             ("gemma3", "slicegpt needs pre-norm blocks")])
def test_families_it_cannot_slice_are_refused_before_any_change(family, message, calib_ids):
    model = tiny_model(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ArchitectureError, match=message):
        prune(model, StructuredConfig(method="slicegpt", ratio=0.25, batch_size=2), calib_ids, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("settings, message", [
    (dict(ratio=1.0), "slice must be in"), (dict(ratio=0.0), "slice must be in"),
    (dict(count=3), "give the fraction of the hidden width"), (dict(ratio=0.2, score="wanda"), "--score"),
    (dict(ratio=0.2, refit=True), "refit")])
def test_bad_settings_are_refused(settings, message):
    with pytest.raises(ConfigError, match=message):
        StructuredConfig(method="slicegpt", **settings)


def test_a_slice_that_removes_nothing_is_refused(calib_ids):
    with pytest.raises(ConfigError, match="removes nothing"):
        prune(tiny_model("llama"), StructuredConfig(method="slicegpt", ratio=0.005, batch_size=2), calib_ids,
              progress=False)


def test_the_cli_slices_and_saves_a_plain_model(tiny_dir, tmp_path, capsys):
    out, report = tmp_path / "out", tmp_path / "r.json"
    assert main(["prune", *cli_args(tiny_dir, "--method", "slicegpt", "--slice", "0.25", "--round-to", "8",
                                    "--no-speed"), "--output", str(out), "--report", str(report)]) == 0
    r = json.loads(report.read_text())
    assert {(c["kind"], c["after"]) for c in r["structured"]} == {("hidden", 48)}
    assert tf.AutoModelForCausalLM.from_pretrained(out).config.hidden_size == 48


@pytest.mark.parametrize("flags, message", [(["--method", "slicegpt", "--slice", "1.5"], "slice must be in"),
                                            (["--method", "channels", "--slice", "0.2"], "--slice is the width"),
                                            (["--slice", "0.2", "--ratio", "0.2"], "--slice is the width")])
def test_the_cli_refuses_bad_slices_in_one_line(flags, message, tiny_dir, tmp_path, capsys):
    assert main(["prune", *cli_args(tiny_dir, *flags, "--no-speed"), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------ per-block rotations (the paper's)


def _rotations(model, calib_ids):
    return [principal_rotation(C) for C in stream_covariances(model, calib_ids, 2, torch.device("cpu"),
                                                               Tracker(show=False))]


@pytest.mark.parametrize("family", SLICEABLE)
def test_per_block_rotations_without_slicing_change_no_output(family, calib_ids):
    model = tiny_model(family).eval()
    before = model(_ids()).logits
    rotations = _rotations(model, calib_ids)
    assert len(rotations) == 2 * model.config.num_hidden_layers + 1
    rotate_and_slice(model, rotations, rotations[0].shape[0])
    torch.testing.assert_close(model(_ids()).logits, before, atol=2e-6, rtol=0)


@pytest.mark.parametrize("family", SLICEABLE)
def test_per_block_slicing_is_the_original_projected_at_every_point_onto_its_own_directions(family, calib_ids):
    model = tiny_model(family).eval()
    rotations = _rotations(model, calib_ids)
    P = [(Q[:, :40] @ Q[:, :40].t()).float() for Q in rotations]
    # the original, its stream projected where it is written: P[0] after the embeddings, then after block l's
    # attention P[2l+1] (on the residual and the attention's output alike) and after its MLP P[2l+2]
    reference = copy.deepcopy(model)
    _, blocks = find_blocks(reference)
    blocks[0].register_forward_pre_hook(lambda _m, args, kwargs: ((args[0] @ P[0], *args[1:]), kwargs) if args
                                        else (args, {**kwargs, "hidden_states": kwargs["hidden_states"] @ P[0]}),
                                        with_kwargs=True)
    for i, block in enumerate(blocks):
        add_shortcuts(block, [P[2 * i + 1], P[2 * i + 2]], torch.float32)
        find_attention(block).o[1].register_forward_hook(lambda _m, _a, out, p=P[2 * i + 1]: out @ p)
        find_mlp(block).output[1].register_forward_hook(lambda _m, _a, out, p=P[2 * i + 2]: out @ p)
    want = reference(_ids(1)).logits
    rotate_and_slice(model, rotations, 40)
    torch.testing.assert_close(model(_ids(1)).logits, want, atol=2e-6, rtol=0)


def test_a_per_block_slice_loads_with_secateurs_and_is_refused_by_plain_transformers(calib_ids, tmp_path):
    model = tiny_model("llama").eval()
    prune(model, StructuredConfig(method="slicegpt", ratio=0.25, rotation="per-block", batch_size=2), calib_ids,
          progress=False)
    assert model.config.hidden_size == 64 and model.config.secateurs_structure["hidden"] == 48
    model.save_pretrained(tmp_path)
    with pytest.raises(Exception, match="mismatched_sizes"):  # not loaded without its shortcut matrices
        tf.AutoModelForCausalLM.from_pretrained(tmp_path)
    for again in (load(tmp_path)[0], load_model(str(tmp_path))[0]):
        assert torch.equal(again(_ids()).logits, model(_ids()).logits)
    # decoding with the KV cache gives what the whole sequence gives
    ids = _ids(2, (1, 12))
    with torch.no_grad():
        first = model(ids[:, :8], use_cache=True)
        step = model(ids[:, 8:9], cache=first.cache, use_cache=True).logits[:, -1]
        torch.testing.assert_close(step, model(ids[:, :9]).logits[:, -1], atol=1e-5, rtol=0)


def test_what_would_break_the_shortcut_chain_is_refused(calib_ids):
    model = tiny_model("llama")
    prune(model, StructuredConfig(method="slicegpt", ratio=0.25, rotation="per-block", batch_size=2), calib_ids,
          progress=False)
    with pytest.raises(ConfigError, match="shortcut matrices"):
        prune(model, StructuredConfig(method="blocks", count=1, batch_size=2), calib_ids, progress=False)
    with pytest.raises(ArchitectureError, match="sliced already"):
        prune(model, StructuredConfig(method="slicegpt", ratio=0.25, batch_size=2), calib_ids, progress=False)
    with pytest.raises(ConfigError, match="rotation is read only by slicegpt"):
        StructuredConfig(method="channels", ratio=0.2, rotation="per-block")


def test_the_cli_slices_per_block_and_refuses_what_it_cannot_write(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["prune", *cli_args(tiny_dir, "--method", "slicegpt", "--slice", "0.25", "--rotation", "per-block",
                                    "--no-speed"), "--output", str(out)]) == 0
    assert load(out)[0].config.secateurs_structure["shortcuts"]
    assert main(["export", str(out), "--gguf", str(tmp_path / "m.gguf")]) != 0
    assert "shortcut matrices" in capsys.readouterr().err
    assert main(["prune", *cli_args(tiny_dir, "--method", "slicegpt", "--slice", "0.25", "--rotation", "per-block",
                                    "--no-speed", "--save-format", "sparse"), "--output", str(tmp_path / "s")]) == 2
    assert "saved dense" in capsys.readouterr().err
