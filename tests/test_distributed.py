"""Several processes (torchrun, gloo, one thread each) give one process's result: the calibration batches are
shared out and the statistics summed (engine/distributed.py)."""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from secateurs.engine.distributed import ONE


def _flags(tiny_dir, method, *extra):
    return ["prune", "--model", str(tiny_dir / "model"), "--method", method, "--sparsity", "0.5", "--quiet",
            "--calib-data", str(tiny_dir / "train.txt"), "--calib-samples", "8", "--calib-seqlen", "32",
            "--batch-size", "2", "--eval-data", str(tiny_dir / "test.txt"), "--eval-seqlen", "32",
            "--eval-windows", "3", *extra]


def _run(args, processes: int, env_extra=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)] \
        if processes > 1 else [sys.executable]
    return subprocess.run([*launcher, "-m", "secateurs", *args, "--threads", "1"], capture_output=True, text=True,
                          env=env, timeout=300)


def _weights(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _perplexity(proc) -> str:
    return next(line for line in proc.stdout.splitlines() if line.startswith("pruned perplexity"))


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "wanda+dsnot"])
def test_two_processes_give_one_process_weights(tiny_dir, tmp_path, method):
    method, _, refine = method.partition("+")
    extra = ["--refine", refine, "--refine-threshold", "0"] if refine else []  # dsnot: the channels' sums too
    one = _run(_flags(tiny_dir, method, *extra, "--output", str(tmp_path / "one")), 1)
    two = _run(_flags(tiny_dir, method, *extra, "--output", str(tmp_path / "two"), "--report",
                      str(tmp_path / "r.json")), 2)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert a.keys() == b.keys()
    # the squared norms, the sums and X^T X are added in one process's order: the same bits
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _perplexity(one) == _perplexity(two)  # three decimals, as printed
    assert '"processes": 2' in (tmp_path / "r.json").read_text()
    assert two.stdout.count("pruned perplexity") == 1  # only rank 0 speaks


def test_a_rank_that_dies_stops_the_run_and_nothing_is_written(tiny_dir, tmp_path):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(  # rank 1 dies as it reaches the second block
        "import os\n"
        "if os.environ.get('RANK') == '1':\n"
        "    import secateurs.models.stream as s\n"
        "    enter = s.BlockStream.enter\n"
        "    s.BlockStream.enter = lambda self, i, b: os._exit(9) if i == 1 else enter(self, i, b)\n")
    proc = _run(_flags(tiny_dir, "wanda", "--no-eval", "--output", str(tmp_path / "out")), 2,
                {"PYTHONPATH": f"{hook}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    assert proc.returncode != 0
    assert "secateurs FAILED" in proc.stderr or "another process of this run stopped" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hook"]  # no output, no temporary folder


def test_commands_that_run_in_one_process_say_so(tiny_dir, tmp_path):
    proc = _run(["compare", "--model", str(tiny_dir / "model"), "--methods", "magnitude", "--sparsities", "0.5",
                 "--quiet"], 2)
    assert proc.returncode != 0
    assert "compare runs in one process" in proc.stderr


def test_one_process_shares_nothing():
    assert (ONE.rank, ONE.world, ONE.main) == (0, 1, True)
    assert ONE.share(5) == range(5)
    ids = torch.zeros(7, 4, dtype=torch.long)
    assert torch.equal(ONE.calibration_share(ids, 3), ids)


def test_shares_are_contiguous_and_cover_every_batch():
    from secateurs.engine.distributed import Ranks

    class Rank(Ranks):
        def __init__(self, rank, world):
            self.rank, self.world = rank, world

    for n, world in [(4, 2), (5, 2), (7, 3), (3, 3)]:
        shares = [Rank(r, world).share(n) for r in range(world)]
        assert [i for s in shares for i in s] == list(range(n))
        assert all(len(s) >= 1 for s in shares)
    with pytest.raises(Exception, match="3 processes need at least 3 calibration batches, there are 2"):
        Rank(0, 3).calibration_share(torch.zeros(4, 2, dtype=torch.long), 2)
