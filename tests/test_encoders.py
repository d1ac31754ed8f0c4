"""Encoders (BERT, RoBERTa, DistilBERT): loaded as the class they were saved as, pruned by every weight method,
saved with every weight, measured by accuracy or pseudo-perplexity, fine-tuned as classifiers with masks held."""

import json
import logging

import pytest
import torch
import transformers as tf

from conftest import SENTENCES
from secateurs import EvalConfig, PruneConfig, api, load_model
from secateurs.cli import main
from secateurs.errors import ConfigError, DataError, ModelLoadError
from secateurs.models import save_model

FAMILIES = {"bert": "Bert", "roberta": "Roberta", "distilbert": "DistilBert"}
HEADS = ["Model", "ForMaskedLM", "ForSequenceClassification"]
LABELS = {"cat": "animal", "dog": "animal", "birds": "animal", "rain": "weather", "river": "water"}


def encoder_config(family: str, vocab: int, **extra):
    if family == "distilbert":
        return tf.DistilBertConfig(vocab_size=vocab, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                   max_position_embeddings=64, **extra)
    cls = tf.BertConfig if family == "bert" else tf.RobertaConfig
    return cls(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
               max_position_embeddings=66 if family == "roberta" else 64, **extra)


@pytest.fixture(scope="module")
def wordpiece(tmp_path_factory):
    """A real WordPiece tokenizer (with [CLS], [SEP], [MASK], [PAD]) trained on the test sentences, and texts."""
    from tokenizers import BertWordPieceTokenizer

    root = tmp_path_factory.mktemp("enc")
    text = " ".join(SENTENCES[i % 5] for i in range(400))
    (root / "train.txt").write_text(text)
    (root / "test.txt").write_text(" ".join(SENTENCES[(i * 3) % 5] for i in range(200)))
    trainer = BertWordPieceTokenizer(lowercase=True)
    trainer.train_from_iterator([text], vocab_size=80, min_frequency=1)
    tok = tf.BertTokenizerFast(tokenizer_object=trainer._tokenizer, cls_token="[CLS]", sep_token="[SEP]",
                               mask_token="[MASK]", pad_token="[PAD]", unk_token="[UNK]", model_max_length=64)
    for name, rows in (("train.jsonl", 60), ("test.jsonl", 20)):
        with open(root / name, "w") as fh:
            for k in range(rows):
                sentence = SENTENCES[(k * 7 + (name == "test.jsonl")) % 5]
                label = next(v for w, v in LABELS.items() if w in sentence)
                fh.write(json.dumps({"text": sentence, "label": label}) + "\n")
    return root, tok


def encoder_dir(root, tok, family, head, name=None, **extra):
    torch.manual_seed(0)
    config = encoder_config(family, len(tok), pad_token_id=tok.pad_token_id, **extra)
    model = getattr(tf, FAMILIES[family] + head)(config).eval()
    folder = root / (name or f"{family}-{head}")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def calib(tok, n=4, length=24):
    ids = tok(" ".join(SENTENCES * 4), add_special_tokens=False, return_tensors="pt").input_ids[0]
    return torch.stack([ids[k * 3:k * 3 + length] for k in range(n)])


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_pruned_encoder_keeps_its_class_and_every_weight(wordpiece, tmp_path, family, head):
    root, tok = wordpiece
    folder = encoder_dir(tmp_path, tok, family, head, num_labels=3)
    model, tokenizer = load_model(str(folder))
    assert type(model).__name__ == FAMILIES[family] + head
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    result = api.prune(model, PruneConfig(method="wanda", sparsity=0.5, calib_samples=4, calib_seqlen=24),
                       calib(tok), progress=False)
    assert result.sparsity == pytest.approx(0.5, abs=0.01) and len(result.layers) == 12  # 6 linears x 2 blocks
    pruned = set(f"{r.name}.weight" for r in result.layers)
    for key, value in model.state_dict().items():  # outside the blocks' linears nothing changed (heads too)
        if key not in pruned:
            assert torch.equal(value, dense[key]), key
    out = tmp_path / "out"
    save_model(model, tokenizer, out)
    saved = json.loads((out / "config.json").read_text())
    assert saved["architectures"] == [FAMILIES[family] + head]
    again, _ = load_model(str(out))
    assert type(again) is type(model) and set(again.state_dict()) == set(dense)
    ids = calib(tok, 2, 16)
    with torch.no_grad():
        a, b = model(input_ids=ids), again(input_ids=ids)
    first = (lambda o: o.logits) if head != "Model" else (lambda o: o.last_hidden_state)
    assert torch.equal(first(a), first(b))


@pytest.mark.parametrize("method, pattern", [("magnitude", "unstructured"), ("sparsegpt", "2:4"), ("ria", "4:8"),
                                             ("alps", "unstructured"), ("wanda", "block:8")])
def test_every_weight_method_prunes_a_classifier(wordpiece, tmp_path, method, pattern):
    root, tok = wordpiece
    model, _ = load_model(str(encoder_dir(tmp_path, tok, "bert", "ForSequenceClassification", num_labels=2)))
    cfg = PruneConfig(method=method, pattern=pattern, sparsity=None if ":" in pattern else 0.5, calib_samples=4,
                      calib_seqlen=24, include=("encoder",))
    result = api.prune(model, cfg, calib(tok), progress=False)
    assert result.sparsity == pytest.approx(0.5, abs=0.02)
    assert int((model.classifier.weight == 0).sum()) == 0  # the task head is not in the encoder scope


def test_accuracy_is_the_share_of_argmax_classes_that_match(wordpiece, tmp_path, capsys):
    root, tok = wordpiece
    folder = encoder_dir(tmp_path, tok, "roberta", "ForSequenceClassification", num_labels=3,
                         id2label={0: "animal", 1: "water", 2: "weather"},
                         label2id={"animal": 0, "water": 1, "weather": 2})
    model, tokenizer = load_model(str(folder))
    rows = [json.loads(x) for x in (root / "test.jsonl").read_text().splitlines()]
    with torch.no_grad():
        want = sum(int(model(**tokenizer(r["text"], return_tensors="pt")).logits.argmax()) ==
                   model.config.label2id[r["label"]] for r in rows) / len(rows)
    got = api.evaluate(model, tokenizer, EvalConfig(data=str(root / "test.jsonl"), batch_size=7))
    assert got == pytest.approx(want)
    assert main(["eval", "--model", str(folder), "--data", str(root / "test.jsonl"), "--quiet"]) == 0
    assert f"accuracy: {want:.4f}" in capsys.readouterr().out


def test_pseudo_perplexity_masks_each_token_in_turn(wordpiece, tmp_path):
    from secateurs.eval.encoders import pseudo_perplexity

    root, tok = wordpiece
    model, _ = load_model(str(encoder_dir(tmp_path, tok, "bert", "ForMaskedLM")))
    windows = calib(tok, 2, 10)
    nll = 0.0
    with torch.no_grad():
        for w in windows:
            ids = torch.cat([torch.tensor([tok.cls_token_id]), w, torch.tensor([tok.sep_token_id])])
            for pos in range(1, len(ids) - 1):
                masked = ids.clone()
                masked[pos] = tok.mask_token_id
                nll -= float(torch.log_softmax(model(input_ids=masked[None]).logits[0, pos], -1)[ids[pos]])
    want = float(torch.exp(torch.tensor(nll / windows.numel())))
    assert pseudo_perplexity(model, tok, windows, batch_size=3) == pytest.approx(want, rel=1e-5)


def test_prune_command_on_a_classifier_reports_accuracy(wordpiece, tmp_path, capsys):
    root, tok = wordpiece
    folder = encoder_dir(tmp_path, tok, "distilbert", "ForSequenceClassification", num_labels=3,
                         id2label={0: "animal", 1: "water", 2: "weather"},
                         label2id={"animal": 0, "water": 1, "weather": 2})
    out = tmp_path / "out"
    assert main(["prune", "--model", str(folder), "--method", "wanda", "--sparsity", "0.5", "--include", "encoder",
                 "--calib-data", str(root / "train.txt"), "--calib-samples", "4", "--calib-seqlen", "24",
                 "--eval-data", str(root / "test.jsonl"), "--quiet", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "dense accuracy: " in printed and "pruned accuracy: " in printed
    report = json.loads((out / "secateurs_report.json").read_text())
    assert report["metric"] == "accuracy" and 0 <= report["accuracy"] <= 1 and report["perplexity"] is None
    assert json.loads((out / "config.json").read_text())["architectures"] == ["DistilBertForSequenceClassification"]


def test_classification_finetune_adds_a_head_and_holds_the_masks(wordpiece, tmp_path, capsys):
    root, tok = wordpiece
    bare = encoder_dir(tmp_path, tok, "bert", "Model")
    pruned = tmp_path / "pruned"
    assert main(["prune", "--model", str(bare), "--method", "magnitude", "--sparsity", "0.5", "--no-eval", "--quiet",
                 "--output", str(pruned)]) == 0
    out = tmp_path / "clf"
    assert main(["finetune", "--model", str(pruned), "--task", "classification", "--data", str(root / "train.jsonl"),
                 "--eval-data", str(root / "test.jsonl"), "--epochs", "3", "--train-batch-size", "8", "--lr", "1e-3",
                 "--quiet", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "accuracy " in printed and "sparsity 0.5000 -> 0.5000" in printed
    model, _ = load_model(str(out))
    assert type(model).__name__ == "BertForSequenceClassification"
    assert model.config.label2id == {"animal": 0, "water": 1, "weather": 2}
    report = json.loads((out / "secateurs_report.json").read_text())
    assert report["train"]["steps"] == 23  # ceil(3 epochs x 60 examples / 8)
    assert report["accuracy_after"] >= report["accuracy_before"]
    before, _ = load_model(str(pruned))
    for name, module in before.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layer." in name:
            zeros = module.weight == 0
            assert zeros.any() and torch.all(model.bert.get_submodule(name).weight[zeros] == 0), name


@pytest.mark.parametrize("rows, message", [
    ([{"text": "a", "label": 1.5}], "label 1.5 is float; labels must be integers (class ids) or strings"),
    ([{"text": "a", "label": [1]}], "label [1] is list"),
    ([{"text": 3, "label": 1}], "every example needs a 'text' string"),
    ([{"text": "a"}], "no 'label'"),
])
def test_bad_labels_are_refused_naming_the_row(tmp_path, rows, message):
    from secateurs.data.labelled import load_examples

    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(DataError) as err:
        load_examples(str(path))
    assert message in str(err.value) and "row 1" in str(err.value)


def test_label_sets_must_agree_and_a_model_needs_its_head(wordpiece, tmp_path, capsys):
    root, tok = wordpiece
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"text": "the cat", "label": "plant"}) + "\n")
    bare = encoder_dir(tmp_path, tok, "bert", "Model")
    base = ["finetune", "--model", str(bare), "--task", "classification", "--epochs", "1", "--quiet",
            "--output", str(tmp_path / "o")]
    assert main([*base, "--data", str(root / "train.jsonl"), "--eval-data", str(other)]) == 2
    assert "has labels the training set" in capsys.readouterr().err and not (tmp_path / "o").exists()
    assert main([*base, "--data", str(root / "train.txt")]) == 2  # no labels in plain text
    assert "train.txt' is not labelled" in capsys.readouterr().err
    assert main(["eval", "--model", str(bare), "--quiet"]) == 2
    assert "without a head, with nothing to measure" in capsys.readouterr().err
    mlm = encoder_dir(tmp_path, tok, "bert", "ForMaskedLM")
    assert main(["eval", "--model", str(mlm), "--metric", "accuracy", "--quiet"]) == 2
    assert "accuracy does not apply to BertForMaskedLM" in capsys.readouterr().err


def test_long_texts_are_truncated_with_a_warning(wordpiece, tmp_path, caplog):
    from secateurs.data.labelled import Examples
    from secateurs.eval.encoders import accuracy

    root, tok = wordpiece
    model, _ = load_model(str(encoder_dir(tmp_path, tok, "bert", "ForSequenceClassification", num_labels=2)))
    long = " ".join(SENTENCES * 20)
    with caplog.at_level(logging.WARNING):
        out = accuracy(model, tok, Examples([long, "the cat"], [0, 1], "mem"))
    assert out["examples"] == 2 and "1 of 2 texts are longer than the model's 64 positions" in caplog.text


def test_heads_and_encoders_secateurs_cannot_keep_are_refused(wordpiece, tmp_path, capsys):
    root, tok = wordpiece
    token_clf = encoder_dir(tmp_path, tok, "bert", "ForTokenClassification")
    with pytest.raises(ModelLoadError, match="keeps the bare encoder, the masked LM and the sequence classifier"):
        load_model(str(token_clf))
    albert = tmp_path / "albert"
    tf.AlbertModel(tf.AlbertConfig(vocab_size=len(tok), hidden_size=32, num_attention_heads=4, intermediate_size=64,
                                   embedding_size=16, num_hidden_layers=2)).save_pretrained(albert)
    tok.save_pretrained(albert)
    assert main(["prune", "--model", str(albert), "--method", "magnitude", "--no-eval", "--quiet",
                 "--output", str(tmp_path / "o")]) == 2
    assert "ALBERT checkpoint, whose blocks share one set of weights" in capsys.readouterr().err
    clf = encoder_dir(tmp_path, tok, "bert", "ForSequenceClassification")
    assert main(["prune", "--model", str(clf), "--method", "slicegpt", "--slice", "0.25",
                 "--calib-seqlen", "24", "--no-eval", "--quiet", "--output", str(tmp_path / "o")]) == 2
    assert "encoders take channels (MLP), heads and blocks (whole layers), not slicegpt" in capsys.readouterr().err
    assert main(["prune", "--model", str(clf), "--method", "magnitude", "--include", "nosuchlayer", "--no-eval",
                 "--quiet", "--output", str(tmp_path / "o")]) == 2
    assert "'nosuchlayer' matches no linear layer" in capsys.readouterr().err
    with pytest.raises(ConfigError):
        EvalConfig(metric="bleu")


def test_an_encoder_saved_sparse_reloads_as_itself(wordpiece, tmp_path):
    import secateurs

    root, tok = wordpiece
    folder = encoder_dir(tmp_path, tok, "roberta", "ForMaskedLM")
    outs = {}
    for form in ("dense", "sparse"):
        outs[form] = tmp_path / form
        assert main(["prune", "--model", str(folder), "--method", "magnitude", "--sparsity", "0.5", "--no-eval",
                     "--quiet", "--save-format", form, "--output", str(outs[form])]) == 0
    dense, _ = load_model(str(outs["dense"]))
    sparse, _ = load_model(str(outs["sparse"]))
    again, _ = secateurs.load(outs["sparse"])
    ids = calib(tok, 2, 16)
    with torch.no_grad():
        want = dense(input_ids=ids).logits
        for model in (sparse, again):
            assert type(model).__name__ == "RobertaForMaskedLM" and torch.equal(model(input_ids=ids).logits, want)


def test_the_streamed_walk_refuses_an_encoder(wordpiece, tmp_path):
    root, tok = wordpiece
    folder = encoder_dir(tmp_path, tok, "bert", "ForSequenceClassification")
    cfg = PruneConfig(method="magnitude", sparsity=0.5)
    with pytest.raises(ConfigError, match="is an encoder: it is loaded whole and pruned in memory"):
        api.prune_streamed(folder, cfg, None, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_sweep_of_an_encoder_is_refused_in_one_line(wordpiece, tmp_path, capsys):
    root, tok = wordpiece
    folder = encoder_dir(tmp_path, tok, "bert", "ForSequenceClassification")
    grid = tmp_path / "g.json"
    grid.write_text(json.dumps({"experiments": {"a": {"method": "magnitude"}}}))
    assert main(["sweep", str(grid), "--model", str(folder), "--output", str(tmp_path / "sw"), "--quiet"]) == 2
    assert "is an encoder: a sweep measures causal language models" in capsys.readouterr().err
    assert not (tmp_path / "sw").exists()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_whole_layers_removed_from_an_encoder_load_in_plain_transformers(wordpiece, tmp_path, family):
    root, tok = wordpiece
    folder = encoder_dir(tmp_path, tok, family, "ForSequenceClassification", num_labels=2)
    model, tokenizer = load_model(str(folder))
    result = api.prune(model, secateurs_blocks(), calib(tok), progress=False)
    assert len(result.structured) == 1 and model.config.num_hidden_layers == 1
    out = tmp_path / "out"
    save_model(model, tokenizer, out)
    plain = getattr(tf, FAMILIES[family] + "ForSequenceClassification").from_pretrained(out).eval()
    ids = calib(tok, 2, 16)
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids).logits, model(input_ids=ids).logits)
    key = "n_layers" if family == "distilbert" else "num_hidden_layers"
    assert json.loads((out / "config.json").read_text())[key] == 1


def secateurs_blocks():
    from secateurs import StructuredConfig

    return StructuredConfig(method="blocks", count=1, calib_samples=4, calib_seqlen=24)


def test_prune_command_removes_an_encoder_layer_and_reports_accuracy(wordpiece, tmp_path, capsys):
    root, tok = wordpiece
    folder = encoder_dir(tmp_path, tok, "distilbert", "ForSequenceClassification", num_labels=3,
                         id2label={0: "animal", 1: "water", 2: "weather"},
                         label2id={"animal": 0, "water": 1, "weather": 2})
    out = tmp_path / "out"
    assert main(["prune", "--model", str(folder), "--method", "blocks", "--remove-blocks", "1",
                 "--calib-data", str(root / "train.txt"), "--calib-samples", "4", "--calib-seqlen", "24",
                 "--eval-data", str(root / "test.jsonl"), "--quiet", "--output", str(out)]) == 0
    assert "pruned accuracy: " in capsys.readouterr().out
    model, _ = load_model(str(out))
    assert type(model).__name__ == "DistilBertForSequenceClassification" and model.config.n_layers == 1


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_mlp_channels_cut_from_an_encoder_reload_the_same(wordpiece, tmp_path, family, allocation):
    """Uniform widths: a plain config (intermediate_size, DistilBERT's hidden_dim) that transformers loads;
    per-block widths (global): the recorded structure, loaded by secateurs.load."""
    import secateurs
    from secateurs import StructuredConfig

    root, tok = wordpiece
    model, tokenizer = load_model(str(encoder_dir(tmp_path, tok, family, "ForSequenceClassification", num_labels=2)))
    if allocation == "global":  # 8 dead channels in block 1: the blocks keep different widths
        from secateurs.models.arch import find_blocks
        from secateurs.structured.units import find_mlp

        name, blocks = find_blocks(model)
        mlp = find_mlp(blocks[1], f"{name}.1.")
        for _, m in mlp.inputs:
            m.weight.data[:8] = 0
        mlp.output[1].weight.data[:, :8] = 0
    cfg = StructuredConfig(method="channels", ratio=0.25, allocation=allocation, score="magnitude")
    api.prune(model, cfg, None, progress=False)
    out = tmp_path / "out"
    save_model(model, tokenizer, out)
    cls = getattr(tf, FAMILIES[family] + "ForSequenceClassification")
    again = cls.from_pretrained(out).eval() if allocation == "uniform" else secateurs.load(out)[0]
    assert type(again) is cls
    ids = calib(tok, 2, 16)
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, model(input_ids=ids).logits)
    saved = json.loads((out / "config.json").read_text())
    widths = saved["secateurs_structure"]["mlp"] if "secateurs_structure" in saved else \
        [saved["hidden_dim" if family == "distilbert" else "intermediate_size"]] * 2
    assert sum(widths) == 96  # a quarter of 2 x 64 channels gone
    assert widths == [48, 48] if allocation == "uniform" else widths[0] != widths[1], widths  # per-block widths


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_new_head_sits_on_the_encoder_weights_as_they_were(wordpiece, tmp_path, family):
    from secateurs.training.classify import classifier_for

    root, tok = wordpiece
    mlm, _ = load_model(str(encoder_dir(tmp_path, tok, family, "ForMaskedLM")))
    clf = classifier_for(mlm, ["animal", "water"])
    assert type(clf).__name__ == FAMILIES[family] + "ForSequenceClassification"
    assert clf.config.label2id == {"animal": 0, "water": 1}
    mine = getattr(mlm, mlm.base_model_prefix).state_dict()
    theirs = getattr(clf, clf.base_model_prefix).state_dict()
    assert all(torch.equal(theirs[k], v) for k, v in mine.items())
    with pytest.raises(ConfigError, match="differ from the model's"):
        classifier_for(clf, ["animal", "plant"])



def test_a_head_pruned_masked_lm_is_fine_tuned_as_a_classifier(wordpiece, tmp_path, capsys):
    """A new classifier is built with the cut encoder's recorded structure (fewer heads, per-layer widths)."""
    from secateurs import StructuredConfig

    root, tok = wordpiece
    mlm, tokenizer = load_model(str(encoder_dir(tmp_path, tok, "roberta", "ForMaskedLM")))
    api.prune(mlm, [StructuredConfig(method="heads", ratio=0.5, score="magnitude"),
                    StructuredConfig(method="channels", ratio=0.25, score="magnitude", allocation="global")],
              None, progress=False)
    cut = tmp_path / "cut"
    save_model(mlm, tokenizer, cut)
    out = tmp_path / "clf"
    assert main(["finetune", "--model", str(cut), "--task", "classification", "--data", str(root / "train.jsonl"),
                 "--eval-data", str(root / "test.jsonl"), "--epochs", "1", "--quiet", "--output", str(out)]) == 0
    clf, _ = load_model(str(out))
    assert type(clf).__name__ == "RobertaForSequenceClassification"
    assert clf.config.secateurs_structure["heads"] == [2, 2] == mlm.config.secateurs_structure["heads"]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_heads_cut_from_an_encoder_are_heads_zeroed_and_reload_through_secateurs(wordpiece, tmp_path, family, capsys):
    """Oracle: a removed head is the dense model with that head's columns of the output projection zeroed.  BERT's
    config cannot say fewer heads (head size = hidden / heads): they are recorded, plain transformers refuses the
    folder, secateurs.load rebuilds it."""
    import secateurs
    from secateurs import StructuredConfig
    from secateurs.models.arch import find_blocks
    from secateurs.structured.units import find_attention

    root, tok = wordpiece
    folder = encoder_dir(tmp_path, tok, family, "ForSequenceClassification", num_labels=3,
                         id2label={0: "animal", 1: "water", 2: "weather"},
                         label2id={"animal": 0, "water": 1, "weather": 2})
    model, tokenizer = load_model(str(folder))
    oracle, _ = load_model(str(folder))
    result = api.prune(model, StructuredConfig(method="heads", ratio=0.25, score="magnitude"), None, progress=False)
    name, blocks = find_blocks(oracle)
    for record in result.structured:
        att = find_attention(blocks[record.block], f"{name}.{record.block}.")
        assert (record.before, record.after, len(record.removed)) == (4, 3, 1)
        for h in record.removed:
            att.o[1].weight.data[:, h * att.head_dim:(h + 1) * att.head_dim] = 0
    ids = calib(tok, 2, 16)
    with torch.no_grad():
        want = model(input_ids=ids).logits
        torch.testing.assert_close(want, oracle(input_ids=ids).logits, rtol=1e-5, atol=1e-6)
    out = tmp_path / "out"
    save_model(model, tokenizer, out)
    saved = json.loads((out / "config.json").read_text())
    assert saved["secateurs_structure"]["heads"] == [3, 3]
    assert saved["n_heads" if family == "distilbert" else "num_attention_heads"] == 4  # what plain transformers reads
    cls = getattr(tf, FAMILIES[family] + "ForSequenceClassification")
    with pytest.raises(Exception, match="mismatch|size"):
        cls.from_pretrained(out)
    again, _ = secateurs.load(out)
    assert type(again) is cls
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, want)
    cli_out = tmp_path / "cli"
    assert main(["prune", "--model", str(folder), "--method", "heads", "--ratio", "0.25", "--score", "magnitude",
                 "--eval-data", str(root / "test.jsonl"), "--quiet", "--output", str(cli_out)]) == 0
    assert "load it with secateurs.load" in capsys.readouterr().out
    assert type(load_model(str(cli_out))[0]) is cls


TEXTS = ["the cat sat on the mat.", "a dog ran.", "birds sing at dawn in the park by the old river.", "rain.",
         "the river runs to the sea and the cat sat on the roof."]


def test_padded_examples_calibrate_without_their_padding(wordpiece, tmp_path):
    """An encoder calibrated on examples, one per row, padded: the first block's Wanda masks equal those from the
    examples run one at a time without padding (the padding is masked in attention and left out of the norms)."""
    from secateurs.data.labelled import calibration_examples
    from secateurs.engine.capture import padding_of
    from secateurs.models.arch import find_blocks, find_linears

    root, tok = wordpiece
    folder = encoder_dir(tmp_path, tok, "bert", "ForSequenceClassification", num_labels=2)
    model, tokenizer = load_model(str(folder))
    rows = calibration_examples(model, tokenizer, TEXTS, samples=5, seqlen=64, seed=0)
    assert rows.shape[0] == 5 and (rows[:, 0] == tok.cls_token_id).all()
    mask = padding_of(model, rows)
    assert mask is not None and 0 < int((mask == 0).sum())  # some rows are padded
    name, blocks = find_blocks(model)
    linears = find_linears(blocks[0], f"{name}.0.")
    norms, padded = {n: 0 for n in linears}, {n: 0 for n in linears}

    def summing(into):  # hooks adding every linear's squared input norms into ``into``
        def add(n):
            return lambda module, args: into.__setitem__(n, into[n] + (args[0] ** 2).sum((0, 1)))
        return [m.register_forward_pre_hook(add(n)) for n, m in linears.items()]

    with torch.no_grad():
        hooks = summing(norms)
        for row, keep in zip(rows, mask.bool()):
            model(input_ids=row[keep][None])  # the example alone, no padding
        for h in hooks:
            h.remove()
        hooks = summing(padded)
        model(input_ids=rows)  # padding attended to and counted: what the masks must not be made from
    for h in hooks:
        h.remove()

    def wanda_mask(W, sq):
        score = W.abs() * sq.sqrt()
        return score >= score.sort(dim=1).values[:, W.shape[1] // 2:W.shape[1] // 2 + 1]

    want = {n: wanda_mask(m.weight.detach().clone(), norms[n]) for n, m in linears.items()}
    assert any(not torch.equal(want[n], wanda_mask(m.weight, padded[n])) for n, m in linears.items())
    api.prune(model, PruneConfig(method="wanda", sparsity=0.5, batch_size=2), rows, progress=False)
    for n, m in linears.items():
        assert torch.equal(m.weight != 0, want[n]), n


def test_prune_command_calibrates_an_encoder_on_its_examples(wordpiece, tmp_path, capsys, caplog):
    root, tok = wordpiece
    folder = encoder_dir(tmp_path, tok, "roberta", "ForSequenceClassification", num_labels=3,
                         id2label={0: "animal", 1: "water", 2: "weather"},
                         label2id={"animal": 0, "water": 1, "weather": 2})
    examples = tmp_path / "calib.csv"
    examples.write_text("text\n" + "\n".join(f'"{t}"' for t in TEXTS) + "\n")  # no labels: calibration needs none
    for method in ("sparsegpt", "channels"):
        out = tmp_path / method
        args = ["--sparsity", "0.5"] if method == "sparsegpt" else ["--ratio", "0.25", "--score", "fluctuation"]
        assert main(["prune", "--model", str(folder), "--method", method, *args, "--calib-data", str(examples),
                     "--calib-samples", "4", "--eval-data", str(root / "test.jsonl"), "--quiet",
                     "--output", str(out)]) == 0
        assert "pruned accuracy: " in capsys.readouterr().out
