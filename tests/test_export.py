"""The compressed sparse checkpoint: exact bytes of the codec, bit-exact round trips, every reader, bad files."""

import json
import re
from pathlib import Path

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file, save_file

from conftest import FAMILIES, cli_args, tiny_model
from secateurs import PruneConfig, load, prune, save_model
from secateurs.cli import main
from secateurs.errors import ModelLoadError
from secateurs.export import sparse
from secateurs.export.compressed import compressible, decompress, storage_of
from secateurs.models import load_model
from secateurs.models.stream import Checkpoint

DOCS = Path(__file__).resolve().parents[1] / "docs" / "format.md"


def _bits(t):
    return t.view(torch.uint8) if t.is_floating_point() else t


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(_bits(a[k]), _bits(b[k])) for k in a)


def _weights(folder) -> dict:
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


# ------------------------------------------------------------------------------------------ the codec, exactly


def test_bits_are_packed_least_significant_first_row_by_row():
    codes = torch.tensor([[1, 0, 1, 1, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0, 0, 1, 0]], dtype=torch.uint8)
    assert sparse.pack_bits(codes, 1).tolist() == [[0b1101, 1], [0b10000000, 0]]
    two = torch.tensor([[3, 0, 2, 1, 1]], dtype=torch.uint8)  # 2 bits each: 11 00 01 10 | 01
    assert sparse.pack_bits(two, 2).tolist() == [[0b01100011, 0b01]]
    for bits, codes in [(1, codes), (2, two), (3, torch.randint(0, 8, (5, 11), dtype=torch.uint8))]:
        assert torch.equal(sparse.unpack_bits(sparse.pack_bits(codes, bits), bits, codes.shape[1]), codes)


def test_a_bitmask_stores_the_kept_values_row_by_row():
    w = torch.tensor([[0.0, 2.0, 0.0, -0.0], [5.0, 0.0, 0.0, 7.0]])
    entry = sparse.choose(torch.cat([w, torch.zeros(2, 60)], 1))
    assert entry == {"encoding": "bitmask", "shape": [2, 64], "kept": 4}  # -0.0 has a bit set: it is kept
    parts = sparse.encode(torch.cat([w, torch.zeros(2, 60)], 1), entry)
    assert parts["mask"][:, 0].tolist() == [0b1010, 0b1001]
    assert parts["values"].tolist() == [2.0, -0.0, 5.0, 7.0]
    assert str(parts["values"][1].item()) == "-0.0"


def test_n_m_stores_n_values_and_their_places_in_each_group():
    w = torch.tensor([[0.0, 3.0, 0.0, 4.0, 5.0, 0.0, 0.0, 0.0]])  # the second group keeps one: a zero is stored
    entry = sparse.choose(w, [(2, 4)])
    assert entry == {"encoding": "n:m", "shape": [1, 8], "n": 2, "m": 4}
    parts = sparse.encode(w, entry)
    assert parts["values"].tolist() == [[3.0, 4.0, 5.0, 0.0]]
    assert sparse.unpack_bits(parts["index"], 2, 4).tolist() == [[1, 3, 0, 1]]
    assert parts["index"].tolist() == [[0b01001101]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(37, 64), (3, 5, 48)])
def test_every_encoding_gives_back_every_bit(dtype, shape):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=g).to(dtype)
    w[torch.rand(shape, generator=g) < 0.6] = 0
    w.view(-1)[:3] = torch.tensor([-0.0, float("nan"), float("inf")])
    for patterns in [(), [(1, 4)]]:
        nm = w.clone()
        if patterns:  # keep the largest of every 4, and a -0.0 as the first group's kept value
            groups = nm.view(-1, 4)
            groups.scatter_(1, groups.float().abs().nan_to_num(9.0).argsort(-1, descending=True)[:, 1:], 0.0)
            groups[0] = torch.tensor([0.0, -0.0, 0.0, 0.0])
        entry = sparse.choose(nm, patterns)
        assert entry["encoding"] == ("n:m" if patterns else "bitmask")
        assert torch.equal(_bits(sparse.decode("w", entry, sparse.encode(nm, entry))), _bits(nm))


def test_a_weight_with_few_zeros_stays_a_plain_tensor():
    assert sparse.choose(torch.randn(8, 64)) is None
    w = torch.randn(8, 64)
    w[:, ::2] = 0
    assert sparse.choose(w)["encoding"] == "bitmask"


# ------------------------------------------------------------------------------------------ whole checkpoints


def _pruned(family, pattern, calib_ids, dtype=torch.float32):
    model = tiny_model(family).to(dtype)
    sparsity = None if ":" in pattern and not pattern.startswith("block") else 0.6
    result = prune(model, PruneConfig(method="wanda", pattern=pattern, sparsity=sparsity, batch_size=3), calib_ids,
                   progress=False)
    return model, result


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "4:8", "block:4"])
def test_a_compressed_checkpoint_round_trips_bit_exactly(family, pattern, calib_ids, tmp_path):
    model, result = _pruned(family, pattern, calib_ids, torch.bfloat16)
    save_model(model, None, tmp_path / "dense")
    save_model(model, None, tmp_path / "sparse", compress=compressible(result))
    decompress(tmp_path / "sparse", tmp_path / "back")
    assert _same(_weights(tmp_path / "back"), _weights(tmp_path / "dense"))
    config = json.loads((tmp_path / "sparse" / "config.json").read_text())["secateurs_sparsity"]
    encodings = {e["encoding"] for e in config["tensors"].values()}
    # GPT-2's Conv1D stores its weights (in, out): its N:M groups run down the columns, stored as a bitmask
    assert encodings == ({"n:m"} if pattern in ("2:4", "4:8") and family != "gpt2" else {"bitmask"})
    assert set(config["tensors"]) == {f"{r.name}.weight" for r in result.layers}
    loaded = load(tmp_path / "sparse")[0]  # decoded into memory: the in-memory model's weights
    plain = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    assert _same(loaded.state_dict(), plain.state_dict())
    ids = torch.randint(0, 100, (2, 16))
    assert torch.equal(loaded(ids).logits, plain(ids).logits)


def test_the_pruned_linears_take_the_bytes_the_format_promises(calib_ids, tmp_path):
    for pattern, bound in [("unstructured", 0.5625), ("2:4", 0.5625)]:  # bf16: 1 byte kept + 1 bit per weight
        model, result = _pruned("llama", pattern, calib_ids, torch.bfloat16)
        if pattern == "unstructured":  # 50% exactly: prune again at 0.5
            model = tiny_model("llama").to(torch.bfloat16)
            result = prune(model, PruneConfig(method="wanda", sparsity=0.5, batch_size=3), calib_ids, progress=False)
        save_model(model, None, tmp_path / pattern, compress=compressible(result))
        storage = storage_of(tmp_path / pattern)
        assert storage["encoded"]["ratio"] == pytest.approx(bound, abs=1e-3)
        files = sum(p.stat().st_size for p in (tmp_path / pattern).glob("*.safetensors"))
        assert storage["weight_bytes"] == files and storage["ratio"] < 1


def test_plain_transformers_refuses_a_compressed_folder_loudly(calib_ids, tmp_path):
    model, result = _pruned("llama", "unstructured", calib_ids)
    save_model(model, None, tmp_path / "sparse", compress=compressible(result))
    with pytest.raises(OSError):  # no model.safetensors: never a model with random weights
        tf.AutoModelForCausalLM.from_pretrained(tmp_path / "sparse")
    assert _same(load(tmp_path / "sparse")[0].state_dict(), model.state_dict())  # secateurs.load reads it


def test_the_cli_saves_sparse_streamed_and_in_memory_and_every_command_reads_it(tiny_dir, tmp_path, capsys):
    for how, flags in [("streamed", []), ("memory", ["--no-stream"])]:
        out = tmp_path / how
        assert main(["prune", *cli_args(tiny_dir, "--method", "sparsegpt", "--pattern", "2:4", *flags),
                     "--save-format", "sparse", "--output", str(out), "--report", str(tmp_path / f"{how}.json")]) == 0
        assert "of dense (sparse)" in capsys.readouterr().out
    streamed, memory = (json.loads((tmp_path / f"{h}.json").read_text()) for h in ("streamed", "memory"))
    assert streamed["perplexity"] == memory["perplexity"]  # the streamed run evaluated the compressed folder
    assert streamed["storage"]["encoded"] == memory["storage"]["encoded"]  # the files differ: a shard per block
    assert streamed["storage"]["encoded"]["encodings"] == {"n:m": 14}
    assert _same(load_model(str(tmp_path / "streamed"))[0].state_dict(),
                 load_model(str(tmp_path / "memory"))[0].state_dict())
    ppl = []
    for flags in ([], ["--no-stream"]):
        assert main(["eval", "--model", str(tmp_path / "streamed"), "--quiet", "--data", str(tiny_dir / "test.txt"),
                     "--eval-seqlen", "32", "--eval-windows", "3", *flags]) == 0
        ppl.append(float(re.search(r"perplexity: ([\d.]+)", capsys.readouterr().out)[1]))
    assert ppl == [round(streamed["perplexity"], 3)] * 2
    # a compressed model is pruned again (streamed) like any folder
    again = ["prune", *cli_args(tiny_dir, "--method", "magnitude", "--sparsity", "0.7", "--no-eval")]
    again[again.index("--model") + 1] = str(tmp_path / "streamed")
    assert main([*again, "--output", str(tmp_path / "again")]) == 0
    assert main(["decompress", str(tmp_path / "streamed"), str(tmp_path / "dense"), "--quiet"]) == 0
    assert tf.AutoModelForCausalLM.from_pretrained(tmp_path / "dense") is not None
    assert (tmp_path / "dense" / "tokenizer_config.json").exists()
    assert (tmp_path / "dense" / "secateurs_report.json").exists()


# ---------------------------------------------------------------------------------------------- bad input


def _compressed(calib_ids, folder):
    model, result = _pruned("llama", "unstructured", calib_ids)
    save_model(model, None, folder, compress=compressible(result))
    return folder


def _rewrite(folder, change):
    path = next(folder.glob("model.sparse-*.safetensors"))
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _entry(folder, change):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    change(config["secateurs_sparsity"])
    path.write_text(json.dumps(config))


W = "model.layers.0.mlp.up_proj.weight"


@pytest.mark.parametrize("damage, message", [
    (lambda f: _rewrite(f, lambda t: t.update({f"{W}.values": t[f"{W}.values"][:-1]})), "has shape"),
    (lambda f: _entry(f, lambda e: e["tensors"][W].update(kept=e["tensors"][W]["kept"] - 1)), "has shape"),
    (lambda f: _rewrite(f, lambda t: t[f"{W}.mask"].view(-1)[:1].fill_(255)), "bitmask keeps"),
    (lambda f: _entry(f, lambda e: e.update(version=2)), "version 2"),
    (lambda f: _entry(f, lambda e: e["tensors"][W].update(encoding="zstd")), "unknown encoding"),
    (lambda f: _rewrite(f, lambda t: t.pop(f"{W}.mask")), "lacks"),
    (lambda f: (lambda p: p.write_bytes(p.read_bytes()[:-100]))(next(f.glob("model.sparse-*"))), "truncated"),
])
def test_a_damaged_compressed_checkpoint_is_refused_in_one_line(calib_ids, tmp_path, capsys, damage, message):
    folder = _compressed(calib_ids, tmp_path / "sparse")
    damage(folder)
    assert main(["decompress", str(folder), str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    with pytest.raises(ModelLoadError, match=message):
        load(folder)


def test_an_n_m_index_outside_its_group_is_refused(calib_ids, tmp_path):
    model, result = _pruned("llama", "2:4", calib_ids)
    save_model(model, None, tmp_path / "s", compress=compressible(result))
    _rewrite(tmp_path / "s", lambda t: t[f"{W}.index"].view(-1)[:1].fill_(0))  # places 0, 0, 0, 0: one twice
    with pytest.raises(ModelLoadError, match="one place twice"):
        load(tmp_path / "s")


def test_decompress_follows_the_overwrite_rules_and_refuses_a_dense_folder(calib_ids, tmp_path, capsys):
    folder = _compressed(calib_ids, tmp_path / "sparse")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("keep")
    assert main(["decompress", str(folder), str(tmp_path / "taken")]) == 2
    assert "--overwrite" in capsys.readouterr().err and (tmp_path / "taken" / "x").exists()
    assert main(["decompress", str(folder), str(tmp_path / "taken"), "--overwrite", "--quiet"]) == 0
    assert main(["decompress", str(tmp_path / "taken"), str(tmp_path / "again")]) == 2
    assert "not a compressed sparse checkpoint" in capsys.readouterr().err


def test_per_block_widths_are_refused_before_any_work(tiny_dir, tmp_path, capsys):
    assert main(["prune", *cli_args(tiny_dir, "--method", "channels", "--ratio", "0.25", "--allocation", "global"),
                 "--save-format", "sparse", "--output", str(tmp_path / "o")]) == 2
    assert "saved dense" in capsys.readouterr().err and not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------- the documented reader


def test_the_reference_reader_in_the_docs_reads_a_compressed_checkpoint(calib_ids, tmp_path):
    code = re.search(r"```python\n(# reference reader.*?)```", DOCS.read_text(), re.S)[1]
    assert len(code.strip().splitlines()) <= 60
    assert "secateurs" not in code.replace("secateurs_sparsity", "").replace("secateurs-sparse", "")
    namespace = {}
    exec(compile(code, str(DOCS), "exec"), namespace)
    for pattern in ("unstructured", "2:4", "4:8"):
        model, result = _pruned("llama", pattern, calib_ids, torch.bfloat16)
        save_model(model, None, tmp_path / pattern, compress=compressible(result))
        save_model(model, None, tmp_path / f"{pattern}-dense")
        assert _same(namespace["read_compressed"](tmp_path / pattern), _weights(tmp_path / f"{pattern}-dense"))
    for pattern, quant, sparsity in [("unstructured", "int4", 0.5), ("2:4", "int8", None), ("unstructured", "int4", 0),
                                     ("2:4", "none+permute", None), ("2:4", "int4+permute", None)]:
        model = tiny_model("llama").to(torch.bfloat16)
        quant, permuted = quant.split("+")[0], quant.endswith("+permute")  # RIA's channel permutation: "order"
        config = PruneConfig(method="ria" if permuted else "sparsegpt", pattern=pattern, sparsity=sparsity, quant=quant,
                             group_size=None if quant == "none" else 32, batch_size=3,
                             options={"permute": True} if permuted else {})
        result = prune(model, config, calib_ids, progress=False)
        folder = tmp_path / f"{pattern}-{quant}-{sparsity}"
        save_model(model, None, folder, compress=compressible(result))
        memory = {k: v for k, v in model.state_dict().items() if not k.endswith("weight_scale")}
        assert _same(namespace["read_compressed"](folder), memory)


# ------------------------------------------------------------------------------------------------------ GGUF


def _gguf_model(path):
    """The model and tokenizer transformers' own GGUF loader makes of file ``path``."""
    model = tf.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval(), tf.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def _tiny_folder(tiny_dir, tmp_path, *flags):
    out = tmp_path / "pruned"
    assert main(["prune", *cli_args(tiny_dir, "--no-eval", *flags), "--output", str(out)]) == 0
    return out


@pytest.mark.parametrize("save_format", ["dense", "sparse"])
def test_a_pruned_model_exported_to_gguf_loads_in_transformers_with_the_same_logits(tiny_dir, tmp_path, save_format):
    folder = _tiny_folder(tiny_dir, tmp_path, "--method", "wanda", "--save-format", save_format)
    out = tmp_path / "m.gguf"
    assert main(["export", str(folder), "--gguf", str(out), "--quiet"]) == 0
    model, tok = _gguf_model(out)
    source = load(folder)[0].float()
    ids = torch.tensor([tok("the cat sat on the mat. a dog ran in the park.")["input_ids"]])
    assert ids.tolist() == [load_model(str(folder))[1]("the cat sat on the mat. a dog ran in the park.")["input_ids"]]
    a, b = source(ids).logits, model(ids).logits
    assert torch.allclose(a, b, atol=2e-2, rtol=0) and (a - b).abs().max() > 0  # f16 weights: close, not equal
    assert (model.model.layers[0].mlp.up_proj.weight == 0).float().mean() >= 0.5  # the zeros survive f16


@pytest.mark.parametrize("quant, tol", [("q8_0", 0.1), ("q4_0", 1.0)])
def test_quantized_gguf_files_are_smaller_and_close(tiny_dir, tmp_path, quant, tol):
    folder = _tiny_folder(tiny_dir, tmp_path, "--method", "magnitude")
    f16, q = tmp_path / "f16.gguf", tmp_path / f"{quant}.gguf"
    assert main(["export", str(folder), "--gguf", str(f16), "--quiet"]) == 0
    assert main(["export", str(folder), "--gguf", str(q), "--quant", quant, "--quiet"]) == 0
    assert q.stat().st_size < f16.stat().st_size
    ids = torch.randint(0, 200, (1, 24))
    a, b = _gguf_model(f16)[0](ids).logits, _gguf_model(q)[0](ids).logits
    assert (a - b).abs().max() < tol


def test_a_uniform_structured_cut_exports_and_per_block_widths_are_refused(tiny_dir, tmp_path, capsys, caplog):
    import gguf

    heads = _tiny_folder(tiny_dir, tmp_path, "--method", "heads", "--remove-per-layer", "1", "--no-speed",
                         "--no-bias-compensation")
    assert main(["export", str(heads), "--gguf", str(tmp_path / "h.gguf"), "--quiet"]) == 0
    model, _ = _gguf_model(tmp_path / "h.gguf")
    assert model.config.num_attention_heads == 2  # 4 query heads, one KV group of 2 removed
    ids = torch.randint(0, 200, (1, 16))
    assert torch.allclose(load(heads)[0].float()(ids).logits, model(ids).logits, atol=2e-2)
    # bias compensation gives the attention output a bias: written (llama.cpp reads it), and said
    compensated = tmp_path / "compensated"
    assert main(["prune", *cli_args(tiny_dir, "--no-eval", "--method", "heads", "--remove-per-layer", "1",
                                    "--no-speed"), "--output", str(compensated)]) == 0
    assert main(["export", str(compensated), "--gguf", str(tmp_path / "c.gguf")]) == 0
    names = {t.name for t in gguf.GGUFReader(tmp_path / "c.gguf").tensors}
    assert "blk.0.attn_output.bias" in names and "drops them" in caplog.text
    ragged = tmp_path / "ragged"
    assert main(["prune", *cli_args(tiny_dir, "--no-eval", "--method", "channels", "--ratio", "0.25",
                                    "--allocation", "global", "--no-speed"), "--output", str(ragged)]) == 0
    assert main(["export", str(ragged), "--gguf", str(tmp_path / "r.gguf")]) == 2
    assert "per-block widths" in capsys.readouterr().err and not (tmp_path / "r.gguf").exists()


def test_export_refuses_bad_input_in_one_line(tiny_dir, tmp_path, capsys, calib_ids):
    folder = _tiny_folder(tiny_dir, tmp_path, "--method", "magnitude")
    (tmp_path / "taken.gguf").write_text("keep")
    gpt2 = tmp_path / "gpt2"
    tiny_model("gpt2").save_pretrained(gpt2)
    for argv, message in [
        ([str(folder), "--gguf", str(tmp_path / "taken.gguf")], "--overwrite"),
        ([str(folder), "--gguf", str(tmp_path / "x.bin")], "must end in .gguf"),
        ([str(tmp_path / "nothing"), "--gguf", str(tmp_path / "n.gguf")], "not a model folder"),
        ([str(gpt2), "--gguf", str(tmp_path / "g.gguf")], "supports llama, qwen2"),
        ([str(folder), "--gguf", str(tmp_path)], "must end in .gguf"),
        ([str(folder), "--gguf", str(folder / "config.json" / "m.gguf")], "is a file"),
    ]:
        assert main(["export", *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert (tmp_path / "taken.gguf").read_text() == "keep"
    assert not list(tmp_path.glob(".*.tmp"))


# ------------------------------------------------------------------------------------------- quantization


def test_round_to_nearest_puts_each_group_on_its_own_int4_grid():
    from secateurs.quant import Quant, round_to_nearest

    W = torch.tensor([[1.0, -2.0, 0.5, 3.5, 0.0, 0.0, 0.0, 0.0]])
    Wq, scales = round_to_nearest(W, Quant(4, 4))
    assert scales.tolist() == [[0.5, 0.0]]  # 3.5 / 7, and an all-zero group
    assert Wq.tolist() == [[1.0, -2.0, 0.5, 3.5, 0.0, 0.0, 0.0, 0.0]]  # these lie on the grid already
    Wq, scales = round_to_nearest(torch.tensor([[0.3, -0.74, 7.0, 1.0]]), Quant(4, 4))
    assert scales.tolist() == [[1.0]] and Wq.tolist() == [[0.0, -1.0, 7.0, 1.0]]  # a kept 0.3 becomes 0


@pytest.mark.parametrize("method, pattern, quant", [("wanda", "unstructured", "int4"), ("sparsegpt", "2:4", "int4"),
                                                     ("sparsegpt", "unstructured", "int8"),
                                                     ("magnitude", "unstructured", "int8")])
def test_quantized_weights_round_trip_bit_exactly(method, pattern, quant, calib_ids, tmp_path):
    model = tiny_model("qwen2").to(torch.bfloat16)
    sparsity = None if pattern == "2:4" else 0.5
    result = prune(model, PruneConfig(method=method, pattern=pattern, sparsity=sparsity, quant=quant, group_size=32,
                                      batch_size=3), calib_ids, progress=False)
    save_model(model, None, tmp_path / "q", compress=compressible(result))
    entry = json.loads((tmp_path / "q" / "config.json").read_text())["secateurs_sparsity"]["tensors"]
    assert {json.dumps(e["quant"]) for e in entry.values()} == {json.dumps({"bits": int(quant[3:]), "group_size": 32})}
    memory = {k: v for k, v in model.state_dict().items() if not k.endswith("weight_scale")}
    assert _same(load(tmp_path / "q")[0].state_dict(), memory)  # dequantized to the model's dtype, bit for bit
    decompress(tmp_path / "q", tmp_path / "back")
    assert _same(_weights(tmp_path / "back"), memory)


def test_an_unpruned_weight_is_stored_as_dense_codes(calib_ids, tmp_path):
    model = tiny_model("llama").to(torch.bfloat16)
    result = prune(model, PruneConfig(method="magnitude", sparsity=0.0, quant="int4", group_size=64), None,
                   progress=False)
    save_model(model, None, tmp_path / "q", compress=compressible(result))
    storage = storage_of(tmp_path / "q")
    assert storage["encoded"]["encodings"] == {"dense": 14}
    assert storage["encoded"]["ratio"] == pytest.approx(0.25 + 2 / 64 / 2, abs=1e-4)  # 4 of 16 bits; a scale per 64


def test_the_cli_quantizes_streamed_and_in_memory_alike(tiny_dir, tmp_path, capsys):
    reports = []
    for flags in ([], ["--no-stream"]):
        out = tmp_path / f"q{len(reports)}"
        assert main(["prune", *cli_args(tiny_dir, "--method", "sparsegpt", "--quant", "int4", "--group-size", "32",
                                        *flags), "--save-format", "sparse", "--output", str(out)]) == 0
        reports.append(json.loads((out / "secateurs_report.json").read_text()))
    assert reports[0]["perplexity"] == reports[1]["perplexity"]
    assert _same(load(tmp_path / "q0")[0].state_dict(), load(tmp_path / "q1")[0].state_dict())
    assert reports[0]["storage"]["encoded"] == reports[1]["storage"]["encoded"]


@pytest.mark.parametrize("flags, message", [
    (["--quant", "int4"], "add --save-format sparse"),
    (["--quant", "int4", "--group-size", "48", "--save-format", "sparse"], "does not divide"),
    (["--group-size", "32", "--save-format", "sparse"], "read only with quant"),
    (["--quant", "int4", "--method", "sparsegpt", "--refine", "admm", "--save-format", "sparse"], "--no-joint-quant"),
    (["--quant", "int4", "--allocation", "global", "--save-format", "sparse"], "allocation=global"),
    (["--quant", "int2", "--save-format", "sparse"], "invalid choice"),
    (["--quant", "int4", "--group-size", "32", "--method", "sparsegpt", "--save-format", "sparse", "--no-stream",
      "--save-every", "1"], "needs the streamed prune"),
])
def test_bad_quantization_settings_are_refused_before_any_work(tiny_dir, tmp_path, capsys, flags, message):
    try:
        code = main(["prune", *cli_args(tiny_dir, *flags), "--output", str(tmp_path / "o")])
    except SystemExit as exc:  # argparse's own refusal
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and not (tmp_path / "o").exists()


def test_quantization_is_refused_for_conv1d_weights_and_before_the_last_stage(calib_ids):
    from secateurs import ConfigError, Recipe

    with pytest.raises(ConfigError, match="stores \\(in, out\\)"):
        prune(tiny_model("gpt2"), PruneConfig(method="wanda", quant="int8", group_size=32), calib_ids, progress=False)
    with pytest.raises(ConfigError, match="last stage"):
        prune(tiny_model("llama"), Recipe([PruneConfig(method="wanda", quant="int8"), PruneConfig(method="magnitude")]),
              calib_ids, progress=False)


def test_llama_cpp_runs_an_exported_model_to_the_same_logits(tiny_dir, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")  # built from source where it installs; not in CI
    folder = _tiny_folder(tiny_dir, tmp_path, "--method", "wanda")
    assert main(["export", str(folder), "--gguf", str(tmp_path / "m.gguf"), "--quiet"]) == 0
    llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), n_ctx=64, n_threads=1, logits_all=True, verbose=False)
    model, tok = load_model(str(folder))
    ids = tok("the cat sat on the mat. a dog ran in the park.")["input_ids"]
    assert llm.tokenize(b"the cat sat on the mat. a dog ran in the park.", add_bos=False) == ids
    llm.eval(ids)
    got = torch.tensor(llm.scores[: len(ids)])
    llm.close()
    want = model.float()(torch.tensor([ids])).logits[0]
    assert torch.allclose(got, want, atol=2e-2) and (got.argmax(-1) == want.argmax(-1)).all()


def test_iterate_refuses_quantization_before_any_cycle(tmp_path):
    from secateurs import ConfigError
    from secateurs.training import TrainConfig, iterate

    with pytest.raises(ConfigError, match="quantize the final model"):
        iterate(tiny_model("llama"), None, PruneConfig(method="magnitude", quant="int4", group_size=32), [0.5],
                TrainConfig(), tmp_path / "cycles")
    assert not (tmp_path / "cycles").exists()


def test_a_streamed_walk_saved_every_block_keeps_the_quantization_scales(tiny_dir, tmp_path):
    flags = ["--method", "sparsegpt", "--quant", "int4", "--group-size", "32", "--no-eval"]
    for name, extra in [("plain", []), ("saved", ["--save-every", "1"])]:
        assert main(["prune", *cli_args(tiny_dir, *flags, *extra), "--save-format", "sparse",
                     "--output", str(tmp_path / name)]) == 0
    a, b = (storage_of(tmp_path / n) for n in ("plain", "saved"))
    assert a["encoded"] == b["encoded"] and a["encoded"]["weights"] == 14  # every weight stored as codes
    assert _same(load(tmp_path / "plain")[0].state_dict(), load(tmp_path / "saved")[0].state_dict())


def test_an_exported_gguf_file_has_an_ordinary_file_s_mode(tiny_dir, tmp_path):
    import os

    folder = _tiny_folder(tiny_dir, tmp_path, "--method", "magnitude")
    assert main(["export", str(folder), "--gguf", str(tmp_path / "m.gguf"), "--quiet"]) == 0
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "m.gguf").stat().st_mode & 0o777 == 0o666 & ~mask
