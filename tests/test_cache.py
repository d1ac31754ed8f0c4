"""The built-in model and text are cached after their first use; a cache that cannot be written only costs time."""

import torch
import transformers as tf

import secateurs.models.load as load
from conftest import tiny_model
from secateurs.data import build_enwiki, load_text


def test_the_built_in_text_works_when_its_cache_cannot_be_written(monkeypatch, caplog, unwritable):
    monkeypatch.setenv("SECATEURS_CACHE", "/sys/secateurs-test")
    assert load_text("enwiki", "test") == build_enwiki()[1]
    assert "cannot cache the built-in text in /sys/secateurs-test/data/enwiki (" in caplog.text
    assert f"{unwritable}: '/sys/secateurs-test'" in caplog.text  # the system's own reason


def test_the_built_in_model_works_when_its_cache_cannot_be_written(monkeypatch, caplog, unwritable, tmp_path):
    monkeypatch.setenv("SECATEURS_CACHE", "/sys/secateurs-test")
    converted = tiny_model("llama")  # stands in for the ~30 s conversion of the real GGUF file
    monkeypatch.setattr(load, "_package_dir", lambda package, pip: tmp_path)
    monkeypatch.setattr(load, "_load_gguf", lambda path, dtype: (converted, None))
    model, tokenizer = load.load_model("smollm2-135m")
    assert model is converted and not model.training
    assert "cannot cache the converted model in /sys/secateurs-test/models/smollm2-135m (" in caplog.text


def test_a_cache_another_run_finished_meanwhile_is_used_not_replaced(monkeypatch, caplog, tmp_path, tiny_dir):
    import shutil

    monkeypatch.setenv("SECATEURS_CACHE", str(tmp_path / "cache"))
    cached = tmp_path / "cache" / "models" / "smollm2-135m"
    cached.mkdir(parents=True)  # a folder without its config is unfinished: converted anew
    (cached / "junk").write_text("half")

    def convert_while_another_run_finishes(path, dtype):
        assert not cached.exists()
        shutil.copytree(tiny_dir / "model", cached)  # the other run's rename
        return tiny_model("llama"), None

    monkeypatch.setattr(load, "_package_dir", lambda package, pip: tmp_path)
    monkeypatch.setattr(load, "_load_gguf", convert_while_another_run_finishes)
    caplog.set_level("INFO")
    model, tokenizer = load.load_model("smollm2-135m")
    assert sorted(p.name for p in cached.iterdir()) == sorted(p.name for p in (tiny_dir / "model").iterdir())
    theirs = tf.AutoModelForCausalLM.from_pretrained(tiny_dir / "model")
    assert torch.equal(model.lm_head.weight, theirs.lm_head.weight) and tokenizer is not None
    assert "another run cached smollm2-135m first; using its copy" in caplog.text
