import json

import pytest
import torch

from conftest import tiny_model
from secateurs import EvalConfig, PruneConfig, compare, load_model, prune
from secateurs.errors import SnapshotError
from secateurs.models.snapshot import WeightSnapshot


@pytest.mark.parametrize("family, dtype", [("gpt2", torch.float32), ("llama", torch.bfloat16)])
def test_a_snapshot_puts_every_tensor_back_in_place(family, dtype, tmp_path):
    model = tiny_model(family).to(dtype)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    where = {k: v.data_ptr() for k, v in model.state_dict().items()}
    with WeightSnapshot(model, directory=str(tmp_path)) as snapshot:
        assert list(tmp_path.iterdir()) == []  # the file has no name: nothing to leave behind
        prune(model, PruneConfig(method="magnitude", sparsity=0.5), progress=False)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1)
        assert not torch.equal(model.state_dict()["lm_head.weight"], dense["lm_head.weight"])
        snapshot.restore(model)
    restored = model.state_dict()
    assert all(torch.equal(restored[k], dense[k]) for k in dense)
    assert {k: v.data_ptr() for k, v in restored.items()} == where  # written into the model's own tensors
    if family == "gpt2":  # tied embeddings were written once and are still one tensor
        assert len(snapshot.entries) == len(dense) - 1
        assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()


def test_a_snapshot_restores_tensors_that_are_not_contiguous():
    module = torch.nn.Module()
    module.w = torch.nn.Parameter(torch.arange(12.0).reshape(3, 4).t())  # (4, 3), strides (1, 4)
    module.register_buffer("steps", torch.tensor(7))
    with WeightSnapshot(module) as snapshot:
        with torch.no_grad():
            module.w.mul_(-1)
            module.steps.fill_(0)
        snapshot.restore(module)
    assert torch.equal(module.w, torch.arange(12.0).reshape(3, 4).t()) and not module.w.is_contiguous()
    assert int(module.steps) == 7


def test_a_snapshot_refuses_a_model_whose_tensors_changed_shape():
    model = tiny_model("llama")
    with WeightSnapshot(model) as snapshot:
        model.model.layers[0].mlp.down_proj.weight = torch.nn.Parameter(torch.zeros(64, 100))
        with pytest.raises(SnapshotError, match=r"cannot restore model\.layers\.0\.mlp\.down_proj\.weight"):
            snapshot.restore(model)


def test_compare_gives_the_dense_model_back_even_when_a_cell_fails(tiny_dir, monkeypatch):
    import secateurs.api as api

    model, tok = load_model(str(tiny_dir / "model"))
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    real_evaluate, calls = api.evaluate, []

    def evaluate_then_fail(*a, **k):  # the dense evaluation works, the first pruned one fails
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return real_evaluate(*a, **k)

    monkeypatch.setattr(api, "evaluate", evaluate_then_fail)
    with pytest.raises(RuntimeError, match="out of memory"):
        compare(model, tok, ["magnitude"], ["0.5"], eval_config=EvalConfig(data=str(tiny_dir / "test.txt"),
                                                                            seqlen=32, windows=2), progress=False)
    assert len(calls) == 2
    assert all(torch.equal(v, dense[k]) for k, v in model.state_dict().items())


def test_a_full_disk_is_a_one_line_error(tiny_dir, capsys, monkeypatch):
    import errno

    import secateurs.models.snapshot as snapshot_module
    from conftest import cli_args
    from secateurs.cli import main

    class FullDisk:
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            pass

    monkeypatch.setattr(snapshot_module.tempfile, "TemporaryFile", lambda dir=None: FullDisk())
    flags = cli_args(tiny_dir, "--methods", "magnitude", "--sparsities", "0.5", "--no-stream")  # in memory
    assert main(["compare", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("secateurs: error: cannot keep the model's weights in a temporary file") and "\n" not in err
    assert "No space left on device" in err and "TMPDIR" in err


def test_a_streamed_compare_without_room_for_a_cell_is_a_one_line_error(tiny_dir, tmp_path, capsys, free_space):
    from conftest import cli_args
    from secateurs.cli import main

    report = tmp_path / "t.json"
    free_space(2**20)  # the cell's model is written to a temporary folder: its room is checked first
    assert main(["compare", *cli_args(tiny_dir, "--methods", "magnitude", "--sparsities", "0.5"),
                 "--report", str(report)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("secateurs: error: ") and err.count("\n") == 1 and "MiB free" in err
    assert json.loads(report.read_text())["rows"] == []  # the dense perplexity was kept
