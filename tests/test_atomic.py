import os
import subprocess
import sys

import pytest
import torch
import transformers as tf

from conftest import tiny_model
from secateurs import atomic, save_model
from secateurs.errors import OutputError


def ended_pid() -> int:
    """The id of a process that has run and ended (ids are handed out in turn, so it is not reused at once)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def leftovers(folder, name, dead):
    """Temporary siblings of ``folder/name`` as a killed run, a running one and another machine leave them, and
    one a killed run left for another target."""
    def of_ended_run(target):  # .TARGET.tmp-HOST-PID- with the ended process's id
        return folder / (atomic.temp_prefix(folder / target)[: -len(f"{os.getpid()}-")] + f"{dead}-x")

    running = folder / (atomic.temp_prefix(folder / name) + "x")
    elsewhere = folder / f".{name}.tmp-another.machine-{dead}-x"
    return of_ended_run(name), running, elsewhere, of_ended_run("other")


def test_the_temporary_name_says_host_and_process(tmp_path):
    prefix = atomic.temp_prefix(tmp_path / "model")
    assert prefix.startswith(".model.tmp-") and prefix.endswith(f"-{os.getpid()}-")


def test_save_model_removes_what_a_killed_run_left_and_nothing_else(tmp_path, caplog):
    dead = ended_pid()
    killed, running, elsewhere, other_target = leftovers(tmp_path, "out", dead)
    for folder in (killed, running, elsewhere, other_target):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half")
    save_model(tiny_model("llama"), None, tmp_path / "out")
    assert not killed.exists()
    assert running.is_dir() and elsewhere.is_dir() and other_target.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["out", running.name, elsewhere.name, other_target.name])
    assert (tmp_path / "out" / "config.json").is_file()
    assert f"removed {killed}, left half-written by an earlier run (process {dead}) that was killed" in caplog.text


def test_a_file_written_atomically_clears_a_killed_run_s_temporary_file(tmp_path):
    dead = ended_pid()
    killed, running, _, _ = leftovers(tmp_path, "r.json", dead)
    killed.write_text("{half")
    running.write_text("{half")
    atomic.write_text(tmp_path / "r.json", '{"ok": "ü"}\n')
    assert (tmp_path / "r.json").read_text(encoding="utf-8") == '{"ok": "ü"}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["r.json", running.name])


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    (tmp_path / "r.json").write_text("old")

    def fail(tmp):
        open(tmp, "w").write("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic.replace_file(tmp_path / "r.json", fail)
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
    assert (tmp_path / "r.json").read_text() == "old"


KILLED_WHILE_SAVING = """
import sys, time
import torch, transformers as tf
from secateurs import save_model

def slow(self, folder, **kw):
    open(f"{folder}/model.safetensors", "wb").write(b"half")
    print("saving", flush=True)
    time.sleep(60)

tf.PreTrainedModel.save_pretrained = slow
config = tf.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                        num_key_value_heads=1, vocab_size=64)
save_model(tf.LlamaForCausalLM(config), None, sys.argv[1])
"""


def test_a_run_killed_while_saving_is_cleaned_up_by_the_next_save(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WHILE_SAVING, str(tmp_path / "out")],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "saving\n"
    finally:
        proc.kill()  # SIGKILL: no handler runs, nothing is cleaned up
        proc.wait()
    [left] = tmp_path.iterdir()
    assert left.name.startswith(".out.tmp-") and (left / "model.safetensors").read_bytes() == b"half"
    save_model(tiny_model("llama"), None, tmp_path / "out")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_folder_another_run_saved_meanwhile_is_not_replaced_without_overwrite(tmp_path, monkeypatch):
    model, out = tiny_model("llama"), tmp_path / "out"
    save = tf.PreTrainedModel.save_pretrained

    def meanwhile(self, folder, **kw):  # another run saves to the same place while this one writes
        out.mkdir()
        (out / "theirs.txt").write_text("theirs")
        save(self, folder, **kw)

    monkeypatch.setattr(tf.PreTrainedModel, "save_pretrained", meanwhile)
    with pytest.raises(OutputError, match="exists and is not empty"):
        save_model(model, None, out)
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in out.iterdir()] == ["theirs.txt"]
    out.joinpath("theirs.txt").unlink()
    out.rmdir()
    save_model(model, None, out, overwrite=True)  # with overwrite, this run's model replaces theirs
    assert (out / "config.json").is_file() and not (out / "theirs.txt").exists()


def test_a_file_written_atomically_is_as_readable_as_any_new_file_or_keeps_the_mode_it_had(tmp_path):
    before = os.umask(0o022)
    try:
        atomic.write_text(tmp_path / "table.md", "| a |\n")
    finally:
        os.umask(before)
    assert (tmp_path / "table.md").stat().st_mode & 0o777 == 0o644  # not mkstemp's 0o600
    (tmp_path / "table.md").chmod(0o640)
    atomic.write_text(tmp_path / "table.md", "| b |\n")
    assert (tmp_path / "table.md").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "table.md").read_text() == "| b |\n"


def test_saved_weights_are_as_readable_as_the_other_files(tmp_path):
    """safetensors 0.8 makes its files 0o600 whatever the umask; a saved model must be loadable by others."""
    from safetensors.torch import save_file

    before = os.umask(0o022)
    try:
        save_model(tiny_model("llama"), None, tmp_path / "out")
        atomic.replace_file(tmp_path / "w.safetensors", lambda tmp: save_file({"a": torch.zeros(2)}, tmp))
    finally:
        os.umask(before)
    modes = {p.name: p.stat().st_mode & 0o777 for p in [*(tmp_path / "out").iterdir(), tmp_path / "w.safetensors"]}
    assert "model.safetensors" in modes and set(modes.values()) == {0o644}, modes
