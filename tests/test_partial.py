"""Honest reports: weights in scope that the engine cannot prune (GPT-OSS's experts, stored transposed with
biases) are named, counted in the measured sparsity, and refused unless the user narrows the scope or allows
it."""

import json

import pytest
import torch
import transformers as tf

from conftest import tiny_moe
from secateurs import ConfigError, PruneConfig, prune
from secateurs.cli import main

CALIB = dict(calib_samples=4, calib_seqlen=32, batch_size=2)


def scope_zeros(model, include=("all",)) -> float:
    """Zeros / total over every 2-D (or larger) weight of the blocks, counted directly."""
    cfg = PruneConfig(include=tuple(include))
    from secateurs.models.arch import role_of

    zeros = total = 0
    for name, p in model.model.layers.named_parameters():
        owner = f"model.layers.{name}".rsplit(".", 1)[0]
        if p.dim() >= 2 and cfg.selects(owner, role_of(owner)):
            zeros += int((p == 0).sum())
            total += p.numel()
    return zeros / total


def test_a_scope_mostly_made_of_experts_is_refused_naming_them(calib_ids):
    model = tiny_moe("gptoss")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=r"experts.*--allow-partial"):
        prune(model, PruneConfig(method="wanda", **CALIB), calib_ids, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing changed


def test_an_allowed_partial_prune_reports_the_sparsity_of_the_whole_scope(calib_ids, caplog):
    model = tiny_moe("gptoss")
    result = prune(model, PruneConfig(method="wanda", allow_partial=True, **CALIB), calib_ids, progress=False)
    assert any("experts" in n for n in result.untouched) and "left as they are" in caplog.text
    assert result.sparsity == pytest.approx(scope_zeros(model), abs=1e-9)
    assert result.sparsity < 0.4  # not the 0.5 asked for, and said so
    assert result.to_dict()["untouched"] == result.untouched


def test_attention_only_is_a_full_prune(calib_ids):
    model = tiny_moe("gptoss")
    result = prune(model, PruneConfig(method="wanda", include=("attention",), **CALIB), calib_ids, progress=False)
    assert not result.untouched and result.sparsity == pytest.approx(0.5)
    assert result.sparsity == pytest.approx(scope_zeros(model, ["attention"]))


def test_dense_models_have_nothing_untouched(calib_ids):
    from conftest import tiny_model

    for family in ("llama", "gpt2", "opt"):
        result = prune(tiny_model(family), PruneConfig(method="magnitude"), None, progress=False)
        assert result.untouched == {}


def test_the_cli_refuses_then_runs_an_allowed_partial_prune(tmp_path, capsys, tiny_dir):
    tokenizer = tf.AutoTokenizer.from_pretrained(tiny_dir / "model")
    tiny_moe("gptoss", vocab=len(tokenizer)).save_pretrained(tmp_path / "moe")
    tokenizer.save_pretrained(tmp_path / "moe")
    flags = ["--model", str(tmp_path / "moe"), "--quiet", "--calib-data", str(tiny_dir / "train.txt"),
             "--calib-samples", "4", "--calib-seqlen", "32", "--no-eval", "--method", "wanda"]
    assert main(["prune", *flags, "--output", str(tmp_path / "o")]) == 2
    assert "--allow-partial" in capsys.readouterr().err and not (tmp_path / "o").exists()
    assert main(["prune", *flags, "--allow-partial", "--output", str(tmp_path / "o"),
                 "--report", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["untouched"] and report["streamed"] is True  # GPT-OSS is saved under its modules' names
    saved = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "o")
    assert report["sparsity"] == pytest.approx(scope_zeros(saved), abs=1e-9)
    assert "left as they are, counted" in capsys.readouterr().out
