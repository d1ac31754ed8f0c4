"""Streamed pruning: blocks read from disk one at a time, the output written shard by shard."""

import json

import pytest
import torch
import transformers as tf

from conftest import cli_args, tiny_model
from secateurs import EvalConfig, PruneConfig, Recipe, evaluate, prune
from secateurs.cli import main
from secateurs.api import calibration_data, evaluate_streamed, prune_streamed
from secateurs.errors import ModelLoadError
from secateurs.models import load_model


def _saved(family, folder, dtype=torch.float32, shard=None):
    model = tiny_model(family).to(dtype)
    model.save_pretrained(folder, max_shard_size=shard) if shard else model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "gemma3"])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "wanda+admm"])
def test_a_streamed_prune_writes_the_weights_of_the_in_memory_prune(family, method, calib_ids, tmp_path):
    src = _saved(family, tmp_path / "in", shard="100KB")  # sharded input: several files and an index
    method, _, refine = method.partition("+")
    config = PruneConfig(method=method, sparsity=0.5, batch_size=2, refine=refine or "none")
    whole = tf.AutoModelForCausalLM.from_pretrained(src)
    expected = prune(whole, config, calib_ids, progress=False)
    result = prune_streamed(src, config, calib_ids, tmp_path / "out", progress=False)
    streamed = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # plain transformers
    a, b = whole.state_dict(), streamed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert result.layers == expected.layers
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == whole.config.num_hidden_layers + 1  # a shard per block + rest


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_streamed_recipe_of_several_stages_writes_the_in_memory_weights(calib_ids, tmp_path, dtype):
    src = _saved("llama", tmp_path / "in", dtype)
    recipe = Recipe([PruneConfig(method="wanda", sparsity=0.3, batch_size=2),
                     PruneConfig(method="sparsegpt", sparsity=0.5, pattern="2:4", batch_size=2,
                                 include=["mlp.*"]),
                     PruneConfig(method="magnitude", sparsity=0.6, include=["self_attn.q_proj"])])
    whole = tf.AutoModelForCausalLM.from_pretrained(src, dtype="auto")
    expected = prune(whole, recipe, calib_ids, progress=False)
    result = prune_streamed(src, recipe, calib_ids, tmp_path / "out", progress=False)
    streamed = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype="auto")
    a, b = whole.state_dict(), streamed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert {p.dtype for p in streamed.parameters()} == {dtype}
    assert sorted(r.name for r in result.layers) == sorted(r.name for r in expected.layers)
    assert result.layers == expected.layers
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.is_dir()) == []  # the stages' folders are gone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]


def test_a_recipe_streamed_by_the_cli_checks_room_for_two_models(tiny_dir, tmp_path, capsys, free_space):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages:\n  - {method: wanda, sparsity: 0.3}\n  - {method: magnitude, sparsity: 0.5}\n")
    out, report = tmp_path / "out", tmp_path / "r.json"
    flags = [*cli_args(tiny_dir, "--no-eval"), "--recipe", str(recipe), "--output", str(out)]
    assert main(["prune", *flags, "--report", str(report)]) == 0
    assert json.loads(report.read_text())["streamed"] is True
    assert (out / "model.safetensors.index.json").exists()
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    free_space(size + 20 * 2**20)  # room for one model, not for two
    assert main(["prune", *flags, "--overwrite"]) == 2
    assert "needs" in capsys.readouterr().err


STRUCTURED_CUTS = {
    "channels-fluctuation": dict(method="channels", ratio=0.25, score="fluctuation"),  # adds zero biases (llama)
    "channels-magnitude": dict(method="channels", ratio=0.25, round_to=8, score="magnitude"),  # no data
    "channels-refit": dict(method="channels", ratio=0.25, score="wanda", refit=True),
    "heads": dict(method="heads", count=1),
    "blocks-bi": dict(method="blocks", count=1),
    "blocks-angular": dict(method="blocks", count=1, score="angular"),
}


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3"])
@pytest.mark.parametrize("cut", sorted(STRUCTURED_CUTS))
def test_a_streamed_structured_cut_writes_the_in_memory_model(family, cut, calib_ids, tmp_path):
    from secateurs import StructuredConfig

    if cut == "heads" and family == "gpt2":
        pytest.skip("gpt2's fused q/k/v: head pruning is refused in memory too")
    src = _saved(family, tmp_path / "in", torch.bfloat16, shard="100KB")
    config = StructuredConfig(**STRUCTURED_CUTS[cut], batch_size=2)
    whole = tf.AutoModelForCausalLM.from_pretrained(src, dtype="auto")
    expected = prune(whole, config, calib_ids, progress=False)
    result = prune_streamed(src, config, calib_ids, tmp_path / "out", progress=False)
    streamed = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype="auto")  # plain transformers
    a, b = whole.state_dict(), streamed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    described = lambda m: {k: v for k, v in m.config.to_dict().items() if k != "_name_or_path"}  # noqa: E731
    assert described(streamed) == described(whole)  # widths, heads, layer count: the in-memory cut's config
    assert [r.to_dict() for r in result.structured] == [r.to_dict() for r in expected.structured]
    assert result.block_scores == expected.block_scores
    assert sum(p.numel() for p in streamed.parameters()) < sum(p.numel() for p in
                                                               tf.AutoModelForCausalLM.from_pretrained(src).parameters())


def test_a_streamed_recipe_cuts_channels_then_prunes_weights_as_in_memory(calib_ids, tmp_path):
    from secateurs import StructuredConfig

    src = _saved("llama", tmp_path / "in")
    recipe = Recipe([StructuredConfig(method="channels", ratio=0.25, batch_size=2),
                     PruneConfig(method="sparsegpt", sparsity=0.5, batch_size=2)])
    whole = tf.AutoModelForCausalLM.from_pretrained(src)
    expected = prune(whole, recipe, calib_ids, progress=False)
    result = prune_streamed(src, recipe, calib_ids, tmp_path / "out", progress=False)
    streamed = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    a, b = whole.state_dict(), streamed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert result.layers == expected.layers and len(result.structured) == 2


def test_a_global_structured_allocation_is_not_streamed(calib_ids, tmp_path):
    from secateurs import StructuredConfig
    from secateurs.api import stream_source
    from secateurs.errors import ConfigError

    src = _saved("llama", tmp_path / "in")
    config = StructuredConfig(method="channels", ratio=0.25, allocation="global", batch_size=2)
    assert stream_source(str(src), config) is None  # the command line loads it whole
    with pytest.raises(ConfigError, match="allocation=global ranks every layer at once"):
        prune_streamed(src, config, calib_ids, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_streamed_perplexity_is_the_in_memory_one(tiny_dir):
    folder = tiny_dir / "model"
    model, tok = load_model(str(folder))
    config = EvalConfig(data=str(tiny_dir / "test.txt"), seqlen=32, windows=3)
    assert evaluate_streamed(folder, tok, config, progress=False) == evaluate(model, tok, config, progress=False)


def test_a_bf16_checkpoint_is_pruned_and_saved_in_bf16(calib_ids, tmp_path):
    src = _saved("llama", tmp_path / "in", torch.bfloat16)
    prune_streamed(src, PruneConfig(method="wanda", sparsity=0.5, batch_size=2), calib_ids, tmp_path / "out",
                   progress=False)
    out = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype="auto")
    assert {p.dtype for p in out.parameters()} == {torch.bfloat16}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    size = lambda d: sum(f.stat().st_size for f in d.glob("*.safetensors"))  # noqa: E731
    assert abs(size(tmp_path / "out") - size(src)) <= 0.02 * size(src)
    W = out.model.layers[1].mlp.down_proj.weight
    assert (W == 0).float().mean() == 0.5


def test_the_method_math_runs_in_float32_for_a_bf16_model(calib_ids, tmp_path):
    """A bf16 model pruned in memory and streamed gives the same bf16 weights: statistics and scores in fp32."""
    src = _saved("llama", tmp_path / "in", torch.bfloat16)
    config = PruneConfig(method="sparsegpt", sparsity=0.5, batch_size=2)
    whole = tf.AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    prune(whole, config, calib_ids, progress=False)
    prune_streamed(src, config, calib_ids, tmp_path / "out", progress=False)
    streamed = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype="auto")
    a, b = whole.state_dict(), streamed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("damage, message", [
    ("truncate", "not a readable safetensors file, truncated or damaged"),
    ("remove", r"00002-of-00004.safetensors: missing \(the checkpoint's index names it\)"),
    ("reshape", "has shape"),
])
def test_a_damaged_checkpoint_is_refused_naming_the_file(calib_ids, tmp_path, damage, message):
    src = _saved("llama", tmp_path / "in", shard="100KB")
    shard = sorted(src.glob("model-*.safetensors"))[1]
    if damage == "truncate":
        data = shard.read_bytes()
        shard.write_bytes(data[: len(data) - 100])
    elif damage == "remove":
        shard.unlink()
    else:
        config = json.loads((src / "config.json").read_text())
        config["intermediate_size"] = 96
        (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=message):
        prune_streamed(src, PruneConfig(method="wanda", batch_size=2), calib_ids, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_the_cli_streams_a_safetensors_folder_and_says_so(tiny_dir, tmp_path, capsys):
    from secateurs.cli import main

    out, report = tmp_path / "out", tmp_path / "r.json"
    assert main(["prune", *cli_args(tiny_dir, "--method", "wanda"), "--output", str(out), "--report", str(report)]) == 0
    r = json.loads(report.read_text())
    assert r["streamed"] is True and r["sparsity"] == pytest.approx(0.5) and r["perplexity"] > 1
    model, tok = load_model(str(out))
    assert (model.model.layers[0].mlp.up_proj.weight == 0).float().mean() == 0.5
    assert main(["prune", *cli_args(tiny_dir, "--method", "wanda", "--no-stream"), "--output", str(tmp_path / "o2"),
                 "--report", str(tmp_path / "r2.json")]) == 0
    r2 = json.loads((tmp_path / "r2.json").read_text())
    assert r2["streamed"] is False and r2["perplexity"] == r["perplexity"]
    assert r2["dense_perplexity"] == r["dense_perplexity"]


@pytest.mark.parametrize("error, message", [(OSError("disk full"), "disk full"),
                                            (KeyboardInterrupt(), None)])
def test_a_streamed_prune_that_fails_while_writing_leaves_no_output(tiny_dir, tmp_path, monkeypatch, capsys, error,
                                                                     message):
    from secateurs.cli import main
    from secateurs.models.stream import ShardWriter

    real_write, calls = ShardWriter.write, []

    def write_then_fail(self, tensors):  # the first shard is on disk, then the disk fills up (or Ctrl-C)
        calls.append(1)
        if len(calls) == 2:
            raise error
        real_write(self, tensors)

    monkeypatch.setattr(ShardWriter, "write", write_then_fail)
    code = main(["prune", *cli_args(tiny_dir, "--method", "wanda", "--no-eval"), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == (2 if message else 130)
    assert (f"secateurs: error: {message}\n" == err) if message else "interrupted; nothing was saved" in err
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its temporary sibling


def test_a_gguf_file_is_converted_once_then_streamed(tiny_dir, tmp_path, monkeypatch, capsys):
    """A .gguf model is de-quantised once into a safetensors cache, which the prune streams from (the real
    de-quantisation of the built-in GGUF file is checked in test_real_model.py)."""
    import json

    import secateurs.models.load as load
    from secateurs.cli import main

    monkeypatch.setenv("SECATEURS_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF")  # what _load_gguf would read
    conversions = []

    def convert(path, dtype):
        conversions.append(path)
        return load._from_pretrained(str(tiny_dir / "model"), dtype)

    monkeypatch.setattr(load, "_load_gguf", convert)
    for k in range(2):
        out, report = tmp_path / f"out{k}", tmp_path / f"r{k}.json"
        assert main(["prune", *cli_args(tiny_dir, "--method", "wanda", "--no-eval"), "--model", str(gguf),
                     "--output", str(out), "--report", str(report)]) == 0
        assert json.loads(report.read_text())["streamed"] is True
    assert conversions == [gguf]  # once
    cached = load.gguf_cache(gguf)
    assert cached.parent == tmp_path / "cache" / "gguf" and cached.name.startswith("tiny-")
    assert (cached / "config.json").exists()
    assert load.streamable(str(gguf)) == cached


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_a_streamed_prune_on_cuda_matches_the_cpu(tiny_dir, tmp_path, method):
    """--device cuda: the model stays on disk and the CPU, one block and one batch at a time visit the GPU."""
    from secateurs.cli import main

    outs = {}
    for device in ("cpu", "cuda"):
        outs[device] = tmp_path / device
        assert main(["prune", *cli_args(tiny_dir, "--method", method, "--no-eval", "--device", device),
                     "--output", str(outs[device])]) == 0
    a, b = (tf.AutoModelForCausalLM.from_pretrained(outs[d]).state_dict() for d in ("cpu", "cuda"))
    agree = sum(int(((a[k] == 0) == (b[k] == 0)).sum()) for k in a) / sum(a[k].numel() for k in a)
    assert agree > 0.999  # other kernels may flip a weight at the mask's edge
    kept = {k: (a[k] != 0) & (b[k] != 0) for k in a}
    assert all(torch.allclose(a[k][kept[k]], b[k][kept[k]], rtol=1e-3, atol=1e-5) for k in a)
