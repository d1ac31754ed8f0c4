"""Training side: schedules against hand-computed values, masks that survive optimisers exactly, gradual
pruning that hits the schedule, resumable iterative cycles, LoRA merges that keep zeros, CLI."""

import contextlib
import copy
import json
import math
import pathlib

import pytest
import torch
import transformers as tf

from conftest import tiny_model
from secateurs import PruneConfig, prune
from secateurs.cli import main
from secateurs.config import ConfigError
from secateurs.models import weight_of
from secateurs.training import (GradualPruner, MaskCallback, Masks, Schedule, TrainConfig, add_lora,
                                cycle_sparsities, increment, iterate, measured_sparsity, merge_lora,
                                prunable_linears, train, training_batch, training_state_bytes)

STREAM = torch.arange(400) % 17 + 3  # a periodic token stream a tiny model can learn quickly


# ----------------------------------------------------------------------------- schedules


def test_schedules_by_hand():
    one = Schedule("oneshot", final_sparsity=0.5, start_step=10)
    assert [one(9), one(10), one(100)] == [0.0, 0.5, 0.5]
    lin = Schedule("gradual", initial_sparsity=0.0, final_sparsity=0.5, start_step=0, end_step=100, frequency=10)
    assert lin(15) == pytest.approx(0.05) and lin(99) == pytest.approx(0.45) and lin(100) == 0.5 and lin(500) == 0.5
    cub = Schedule("cubic", initial_sparsity=0.0, final_sparsity=0.5, start_step=0, end_step=100)
    assert cub(50) == pytest.approx(0.5 - 0.5 * 0.5**3)  # 0.4375
    assert cub(0) == 0.0 and cub(100) == 0.5
    late = Schedule("cubic", initial_sparsity=0.1, final_sparsity=0.5, start_step=20, end_step=120, frequency=1)
    assert late(19) == 0.0 and late(20) == pytest.approx(0.1) and late(70) == pytest.approx(0.5 - 0.4 * 0.125)
    exp = Schedule("exponential", final_sparsity=0.5, start_step=0, end_step=100, k=5)
    assert exp(50) == pytest.approx(0.5 * (1 - math.exp(-2.5)))  # 0.458958
    geo = Schedule("geometric", initial_sparsity=0.2, final_sparsity=0.5, start_step=0, end_step=100)
    assert geo(50) == pytest.approx(0.2 * 2.5**0.5) and geo(100) == pytest.approx(0.5)


def test_incremental_sparsity_arithmetic():
    assert increment(0.5, 0.75) == 0.5  # half of the survivors
    assert increment(0.9, 0.99) == pytest.approx(0.9)
    assert increment(0.0, 0.3) == pytest.approx(0.3)
    assert increment(0.6, 0.5) == 0.0
    assert cycle_sparsities(3, 0.5, "gradual") == pytest.approx([1 / 6, 1 / 3, 0.5])
    assert cycle_sparsities(3, 0.5, "geometric", 0.125) == pytest.approx([0.125, 0.25, 0.5])


def test_schedule_validation():
    with pytest.raises(ConfigError, match="unknown"):
        Schedule("quadratic")
    with pytest.raises(ConfigError, match="start_step <= end_step"):
        Schedule("cubic", start_step=10, end_step=5)
    with pytest.raises(ConfigError, match="geometric needs"):
        Schedule("geometric", end_step=10)


# ----------------------------------------------------------------------------- masks


def _pruned_llama(sparsity=0.5):
    model = tiny_model("llama")
    prune(model, PruneConfig(method="magnitude", sparsity=sparsity), progress=False)
    return model


def _zeros(model):
    return {n: weight_of(m) == 0 for n, m in prunable_linears(model).items()}


def _interrupt_at_step(monkeypatch, at: int):
    """Make training raise KeyboardInterrupt (as Ctrl-C would) when it draws step ``at``'s batch."""
    import secateurs.training.finetune as ft

    real_batch = ft.training_batch

    def batch_or_interrupt(ids, batch, seqlen, seed, step, micro=0):
        if step == at:
            raise KeyboardInterrupt
        return real_batch(ids, batch, seqlen, seed, step, micro)

    monkeypatch.setattr(ft, "training_batch", batch_or_interrupt)
    return real_batch


@pytest.mark.parametrize("attach", [True, False])
def test_masks_survive_50_adamw_steps_exactly(attach):
    """AdamW with momentum and weight decay, accumulation, clipping and bf16 autocast: zeros stay zero."""
    model = _pruned_llama()
    before = _zeros(model)
    masks = Masks.from_zeros(model)
    assert masks.sparsity() == pytest.approx(0.5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    model.train()
    with masks.attached(optimizer, model) if attach else contextlib.nullcontext():
        for step in range(50):
            for micro in range(2):
                batch = training_batch(STREAM, 2, 16, 0, step, micro)
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = model(input_ids=batch, labels=batch).loss / 2
                loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
    after = _zeros(model)
    held = all(torch.equal(after[n] & before[n], before[n]) for n in before)
    assert held is attach  # without the hook, momentum revives pruned weights: the check can fail
    if attach:
        W = weight_of(prunable_linears(model)["model.layers.0.mlp.up_proj"])
        assert torch.count_nonzero(W) == W.numel() // 2  # the survivors trained, none died or came back


def test_trainer_callback_holds_the_mask(tmp_path):
    model = _pruned_llama()
    before = _zeros(model)

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, i):
            ids = STREAM[i : i + 16]
            return {"input_ids": ids, "labels": ids}

    args = tf.TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4,
                                learning_rate=1e-2, weight_decay=0.1, report_to=[], save_strategy="no",
                                logging_strategy="no", use_cpu=True, gradient_accumulation_steps=2)
    tf.Trainer(model=model, args=args, train_dataset=Data(), callbacks=[MaskCallback(Masks.from_zeros(model))]).train()
    after = _zeros(model)
    assert all(torch.equal(after[n], before[n]) for n in before)


def test_gradual_pruning_hits_the_schedule_up_to_99_percent():
    model = tiny_model("llama")
    sched = Schedule("cubic", initial_sparsity=0.0, final_sparsity=0.99, start_step=0, end_step=40, frequency=5)
    pruner = GradualPruner(model, sched)
    names = list(pruner.linears)
    previous = _zeros(model)
    updates = 0
    for step in range(45):
        target = pruner.step(step)
        if target is None:
            continue
        updates += 1
        assert measured_sparsity(model, names) == pytest.approx(target, abs=1e-3)
        now = _zeros(model)
        assert all(torch.equal(now[n] & previous[n], previous[n]) for n in now)  # pruned weights stay pruned
        previous = now
    assert updates == 8 and measured_sparsity(model, names) == pytest.approx(0.99, abs=1e-3)


# ----------------------------------------------------------------------------- training, LoRA


def test_short_finetune_lowers_the_training_loss():
    model = _pruned_llama()
    before = _zeros(model)
    history = train(model, STREAM, TrainConfig(steps=30, batch_size=4, seqlen=16, lr=3e-3), progress=False)
    assert sum(history.loss[-5:]) / 5 < 0.7 * sum(history.loss[:5]) / 5
    assert all(torch.equal(_zeros(model)[n], before[n]) for n in before)


def test_lora_merge_keeps_zeros_and_outputs():
    model = _pruned_llama()
    before = _zeros(model)
    add_lora(model, rank=4, alpha=8)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith((".A", ".B")) for n in trainable)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".B"):
                p.normal_()  # as if trained: the update is now far from zero
        x = STREAM[:20].unsqueeze(0)
        unmerged = model(x).logits
    assert merge_lora(model) == 14
    assert all(torch.equal(_zeros(model)[n], before[n]) for n in before)  # exactly the same zeros
    with torch.no_grad():
        assert torch.allclose(model(x).logits, unmerged, atol=1e-4)


def test_lora_training_lowers_the_loss_and_keeps_zeros():
    model = _pruned_llama()
    before = _zeros(model)
    history = train(model, STREAM, TrainConfig(steps=30, batch_size=4, seqlen=16, lr=1e-2, lora_rank=4),
                    progress=False)
    assert sum(history.loss[-5:]) < 0.8 * sum(history.loss[:5])
    assert all(torch.equal(_zeros(model)[n], before[n]) for n in before)


@pytest.mark.parametrize("options", [
    {},  # all weights, the mask frozen
    {"lora_rank": 4},
    # gradual, its schedule done before the checkpoint: the restored masks alone keep the pruned weights at 0
    {"schedule": {"name": "cubic", "final_sparsity": 0.6, "start_step": 0, "end_step": 2, "frequency": 2}},
], ids=["frozen", "lora", "gradual"])
def test_a_finetune_resumed_from_its_checkpoint_ends_identical(options, monkeypatch, tmp_path):
    config = TrainConfig(steps=8, batch_size=2, seqlen=16, lr=3e-3, warmup_steps=3, **options)
    start = _pruned_llama() if "schedule" not in options else tiny_model("llama")
    full = copy.deepcopy(start)
    whole = train(full, STREAM, config, progress=False)

    saved = []
    _interrupt_at_step(monkeypatch, 6)
    with pytest.raises(KeyboardInterrupt):  # a checkpoint every 4 steps: the one at step 4 is the last
        train(copy.deepcopy(start), STREAM, config, progress=False, save_every=4,
              save_state=lambda state: torch.save(state, tmp_path / f"state-{len(saved)}.pt") or saved.append(1))
    monkeypatch.undo()
    assert len(saved) == 1

    state = torch.load(tmp_path / "state-0.pt", weights_only=True)
    assert state["step"] == 4
    resumed = copy.deepcopy(start)
    history = train(resumed, STREAM, config, progress=False, resume=state)
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert history.loss == whole.loss and history.steps == list(range(1, 9))
    assert history.sparsity_updates == whole.sparsity_updates
    with pytest.raises(ValueError, match="another training config"):
        train(copy.deepcopy(start), STREAM, TrainConfig(steps=9, batch_size=2, seqlen=16), progress=False, resume=state)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("lora_rank", [0, 4])
def test_training_state_bytes_estimates_the_saved_state(family, lora_rank, tmp_path):
    model = tiny_model(family)
    config = TrainConfig(steps=3, batch_size=2, seqlen=16, lora_rank=lora_rank)
    estimate = training_state_bytes(model, config)
    sizes = []

    def save(state):
        torch.save(state, tmp_path / "state.pt")
        sizes.append((tmp_path / "state.pt").stat().st_size)

    train(model, STREAM, config, progress=False, save_every=1, save_state=save)
    # the estimate leaves out the archive's own records and the small tensors: 1-8% of these tiny states (whose
    # history grows by a step's loss each time: the archive's 64-byte alignment may add a record's padding)
    assert abs(sizes[0] - sizes[1]) <= 64 and all(0.9 * size < estimate < size for size in sizes)


# ----------------------------------------------------------------------------- iterate


def test_iterate_refuses_a_bad_setting_before_the_first_cycle(tmp_path):
    calib = training_batch(STREAM, 4, 16, 9, 0)
    model = tiny_model("llama")  # 256 positions
    for cfg, train_cfg, message in [
            (PruneConfig(method="wanda", exclude=["q_porj"]), TrainConfig(steps=1, seqlen=16), "'q_porj' matches no"),
            (PruneConfig(method="wanda"), TrainConfig(steps=1, seqlen=300), "training seqlen 300 is longer")]:
        with pytest.raises(ConfigError, match=message):
            iterate(model, None, cfg, [0.2, 0.4], train_cfg, tmp_path / "run", calib, STREAM, progress=False)
        assert not (tmp_path / "run").exists()  # nothing pruned, trained or saved


@pytest.mark.parametrize("lora_rank", [0, 2])
def test_resumed_iterative_run_ends_identical(tmp_path, lora_rank):
    cfg = PruneConfig(method="wanda", sparsity=0.2, batch_size=4)
    calib = training_batch(STREAM, 4, 16, 9, 0)
    train_cfg = TrainConfig(steps=3, batch_size=2, seqlen=16, lr=1e-3, lora_rank=lora_rank)
    targets = [0.2, 0.35, 0.5]

    full = tiny_model("llama")
    history = iterate(full, None, cfg, targets, train_cfg, tmp_path / "a", calib, STREAM, progress=False)
    assert [h["sparsity"] for h in history] == pytest.approx(targets, abs=1 / 64)  # per-row rounding, 64 inputs
    assert all(h["sparsity_after_training"] == h["sparsity"] for h in history)

    part = tiny_model("llama")
    iterate(part, None, cfg, targets, train_cfg, tmp_path / "b", calib, STREAM, progress=False, stop_after=1)
    assert sorted(p.name for p in (tmp_path / "b").glob("cycle-*")) == ["cycle-001"]
    resumed = tiny_model("llama", seed=5)  # a fresh process would start from whatever: the checkpoint decides
    history_b = iterate(resumed, None, cfg, targets, train_cfg, tmp_path / "b", calib, STREAM, progress=False)
    assert [h["cycle"] for h in history_b] == [1, 2, 3]
    a, b = full.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- CLI


def cli_args(tiny_dir, *extra):
    return ["--model", str(tiny_dir / "model"), "--quiet", "--eval-data", str(tiny_dir / "test.txt"),
            "--eval-seqlen", "32", "--eval-windows", "2", "--train-seqlen", "32", "--train-batch-size", "2", *extra]


def test_cli_finetune_and_iterate(tiny_dir, tmp_path):
    pruned = tmp_path / "pruned"
    assert main(["prune", "--model", str(tiny_dir / "model"), "--quiet", "--method", "magnitude", "--no-eval",
                 "--output", str(pruned)]) == 0
    out, report = tmp_path / "ft", tmp_path / "ft.json"
    assert main(["finetune", *cli_args(tiny_dir, "--data", str(tiny_dir / "train.txt"), "--steps", "3",
                                       "--lora-rank", "2", "--lr", "1e-3"),
                 "--model", str(pruned), "--output", str(out), "--report", str(report)]) == 0
    r = json.loads(report.read_text())
    assert r["sparsity_after"] == r["sparsity_before"] == pytest.approx(0.5)
    assert len(r["history"]["loss"]) == 3 and math.isfinite(r["perplexity_after"])
    assert tf.AutoModelForCausalLM.from_pretrained(out) is not None

    gmp = tmp_path / "gmp"
    assert main(["finetune", *cli_args(tiny_dir, "--data", str(tiny_dir / "train.txt"), "--steps", "4",
                                       "--schedule", "cubic", "--final-sparsity", "0.5", "--end-step", "2"),
                 "--output", str(gmp), "--report", str(report)]) == 0
    r = json.loads(report.read_text())
    assert r["sparsity_before"] < 0.01 and r["sparsity_after"] == pytest.approx(0.5)
    assert [u["step"] for u in r["history"]["sparsity_updates"]] == [1, 2]  # cubic from 0: step 0 adds nothing
    assert main(["finetune", *cli_args(tiny_dir, "--data", str(tiny_dir / "train.txt"), "--steps", "2",
                                       "--schedule", "exponential", "--end-step", "1", "--k", "3"),
                 "--output", str(gmp), "--overwrite", "--report", str(report)]) == 0  # a flag its schedule reads
    assert json.loads(report.read_text())["train"]["schedule"]["k"] == 3

    it = tmp_path / "it"
    assert main(["iterate", *cli_args(tiny_dir, "--train-data", str(tiny_dir / "train.txt"), "--calib-data",
                                      str(tiny_dir / "train.txt"), "--calib-samples", "2", "--calib-seqlen", "32",
                                      "--cycles", "2", "--final-sparsity", "0.5", "--steps-per-cycle", "2"),
                 "--output", str(it)]) == 0
    history = json.loads((it / "history.json").read_text())
    assert [round(h["sparsity"], 3) for h in history] == [0.25, 0.5]
    assert (it / "cycle-002" / "config.json").exists()


def test_cli_finetune_resumes_from_its_saved_state(tiny_dir, tmp_path, capsys, monkeypatch):
    import secateurs.training.finetune as ft

    flags = cli_args(tiny_dir, "--data", str(tiny_dir / "train.txt"), "--steps", "5", "--lr", "1e-3")
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert main(["finetune", *flags, "--output", str(whole)]) == 0

    real_batch = _interrupt_at_step(monkeypatch, 3)
    assert main(["finetune", *flags, "--save-every", "2", "--output", str(part)]) == 130
    state = tmp_path / "part.train-state.pt"
    assert f"the last checkpoint is {state}" in capsys.readouterr().err
    assert torch.load(state, weights_only=True)["step"] == 2 and not part.exists()
    monkeypatch.undo()

    assert main(["finetune", *flags[:-2], "--lr", "2e-3", "--save-every", "2", "--output", str(part)]) == 2
    assert "saved with another train" in capsys.readouterr().err
    steps = []
    monkeypatch.setattr(ft, "training_batch", lambda *a, **k: steps.append(a[4]) or real_batch(*a, **k))
    assert main(["finetune", *flags, "--save-every", "2", "--output", str(part)]) == 0
    assert steps == [2, 3, 4]  # only what the checkpoint had not done
    assert "resuming from" in capsys.readouterr().out and not state.exists()
    a = tf.AutoModelForCausalLM.from_pretrained(whole).state_dict()
    b = tf.AutoModelForCausalLM.from_pretrained(part).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = (json.loads((d / "secateurs_report.json").read_text()) for d in (whole, part))
    assert ra["history"]["loss"] == rb["history"]["loss"] and ra["perplexity_after"] == rb["perplexity_after"]


def test_cli_finetune_that_cannot_save_its_state_stops_in_one_line_and_keeps_the_last(tiny_dir, tmp_path, capsys,
                                                                                       monkeypatch):
    flags = cli_args(tiny_dir, "--data", str(tiny_dir / "train.txt"), "--steps", "5", "--save-every", "2")
    state, real_save = tmp_path / "o.train-state.pt", torch.save
    saves = []

    def full_after_one(obj, f, *a, **k):  # the second checkpoint meets a full disk, as torch reports it
        saves.append(obj["step"])
        if len(saves) > 1:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
        real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full_after_one)
    assert main(["finetune", *flags, "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"secateurs: error: cannot save the training state to '{state}' ([enforce fail at "
                          "inline_container.cc:672] . unexpected pos 576 vs 534; ") and len(err.splitlines()) == 1
    assert err.endswith(" MiB free there); the state saved before it, if any, is kept\n")
    assert saves == [2, 4] and torch.load(state, weights_only=True)["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.train-state.pt"]


@pytest.mark.parametrize("cmd, message", [
    (["iterate", "--steps-per-cycle", "2"], "give the sparsities of every cycle, or a number of cycles"),
    (["iterate", "--steps-per-cycle", "2", "--sparsities", "0.5,0.3"], "must not decrease"),
    (["iterate", "--steps-per-cycle", "2", "--sparsities", "0.3,0.5", "--final-sparsity", "0.6"],
     "final_sparsity go(es) with a number of cycles, not with sparsities listed"),
    (["iterate", "--steps-per-cycle", "2", "--sparsities", "0.3", "--cycle-schedule", "cubic", "--initial-sparsity",
      "0.1"], "initial_sparsity, cycle_schedule go(es) with a number of cycles"),
    (["finetune", "--steps", "2", "--final-sparsity", "0.5"], "--final-sparsity need(s) --schedule"),
    (["finetune", "--steps", "2", "--end-step", "1", "--k", "3", "--pattern", "block:2"],
     "--end-step, --k, --pattern need(s) --schedule"),
    (["finetune", "--steps", "2", "--schedule", "cubic", "--k", "3"], "the cubic schedule does not read k"),
    (["finetune", "--steps", "2", "--schedule", "oneshot", "--end-step", "1", "--frequency", "2"],
     "the oneshot schedule does not read end_step, frequency"),
    (["finetune", "--steps", "2", "--schedule", "exponential", "--initial-sparsity", "0.1"],
     "the exponential schedule does not read initial_sparsity"),
    (["finetune", "--steps", "2", "--lora-alpha", "8"], "lora_alpha needs lora_rank"),
    (["finetune", "--steps", "2", "--schedule", "cubic", "--lora-rank", "2"], "no LoRA"),
])
def test_cli_training_errors(tiny_dir, tmp_path, capsys, cmd, message):
    assert main([cmd[0], "--model", str(tiny_dir / "model"), "--quiet", *cmd[1:], "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


class _Planted:
    """A pickle that runs code when loaded by a full unpickler: it would write the file named in its argument."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (pathlib.Path.write_text, (pathlib.Path(self.path), "code ran"))


def test_a_planted_pickle_at_the_state_path_is_refused_without_running(tiny_dir, tmp_path, capsys):
    from secateurs.cli import main
    from secateurs.training.state import state_file

    output, ran = tmp_path / "out", tmp_path / "code-ran.txt"
    torch.save({"step": 1, "payload": _Planted(ran)}, state_file(output))  # a full unpickler would call write_text
    code = main(["finetune", "--model", str(tiny_dir / "model"), "--quiet", "--data", str(tiny_dir / "train.txt"),
                 "--steps", "2", "--eval-data", str(tiny_dir / "test.txt"), "--eval-seqlen", "32",
                 "--eval-windows", "1", "--output", str(output)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "not a training state secateurs can read" in err and len(err.splitlines()) == 1
    assert not ran.exists() and not output.exists()
