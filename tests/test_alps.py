"""ALPS: its weights are the exact least squares on the support it chooses, its supports beat SparseGPT's and
come near the brute-force optimum on small layers, every pattern is kept exactly, and the engine, CLI and
options work."""

import itertools

import pytest
import torch

from conftest import FAMILIES, cli_args, tiny_model
from secateurs import ConfigError, PruneConfig, prune
from secateurs.cli import main
from secateurs.methods import InputStats, LayerTarget, get_method
from secateurs.methods.alps import conjugate_gradients
from secateurs.patterns import Pattern


def layer_problem(n_in=12, n_out=6, tokens=256, seed=0):
    """Correlated inputs (so that reconstruction matters) and their H = X^T X, in float64."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n_in, n_in, generator=g, dtype=torch.float64) * 0.5 + torch.eye(n_in, dtype=torch.float64)
    X = torch.randn(tokens, n_in, generator=g, dtype=torch.float64) @ mix + torch.randn(n_in, generator=g)
    W0 = torch.randn(n_out, n_in, generator=g, dtype=torch.float64)
    return W0, X.t() @ X


def damped(H, percdamp=0.01):
    return H + percdamp * torch.diag(H).mean() * torch.eye(H.shape[0], dtype=H.dtype)


def error(W, W0, H):
    """tr((W - W0) H (W - W0)^T) = ||(W - W0) X^T||^2, the layer's output error on the calibration tokens."""
    return float(torch.einsum("oi,ij,oj->", W - W0, H, W - W0))


def least_squares(W0, H, keep):
    """Row by row, the exact minimiser of (w - w0)^T H (w - w0) with w = 0 off ``keep``."""
    out = torch.zeros_like(W0)
    for r in range(W0.shape[0]):
        S, P = keep[r], ~keep[r]
        out[r, S] = W0[r, S] + torch.linalg.solve(H[S][:, S], H[S][:, P] @ W0[r, P])
    return out


def run(method, W0, H, pattern="unstructured", sparsity=0.5, group="row", **options):
    W = W0.clone()
    stats = InputStats(tokens=256, sq_norms=torch.diag(H).clone(), hessian=H.clone())
    mask = get_method(method, **options).prune(W, stats, LayerTarget(Pattern.parse(pattern), sparsity, group))
    return W, mask


def test_conjugate_gradients_solve_every_rows_own_system():
    """As many steps as unknowns: the exact solution of b_S A_SS = goal_S, row by row, zero off S."""
    W0, H = layer_problem()
    keep = torch.rand(W0.shape, generator=torch.Generator().manual_seed(1)) > 0.4
    goal = W0 @ H
    got = conjugate_gradients(H, goal, torch.zeros_like(W0), keep, steps=12)
    assert (got[~keep] == 0).all()
    assert torch.allclose(got, least_squares(W0, H, keep), rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("pattern,group", [("unstructured", "row"), ("unstructured", "layer"), ("2:4", "row")])
def test_the_weights_are_the_least_squares_on_the_chosen_support(pattern, group):
    W0, H = layer_problem()
    W, mask = run("alps", W0, H, pattern, 0.5, group, pcg_iters=12)  # 12 steps: exact for 12 unknowns
    assert (W[mask] == 0).all()
    assert torch.allclose(W, least_squares(W0, damped(H), ~mask), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_it_beats_wanda_and_sparsegpt_and_comes_near_the_brute_force_optimum(seed):
    """Half of every row of a 12-input layer: all 924 supports of each row tried, each with its least-squares
    weights, give the optimum.  Over seeds 0-7 ALPS measured 1.00-1.35x it; Wanda's mask with least-squares
    weights 1.24-2.64x; SparseGPT's one pass (same count per layer, not per row) 1.48-8.2x."""
    W0, H = layer_problem(seed=seed)
    Hd = damped(H)
    best = sum(min(error(least_squares(W0[r:r + 1], Hd, torch.tensor([[i in s for i in range(12)]])),
                         W0[r:r + 1], Hd) for s in itertools.combinations(range(12), 6))
               for r in range(W0.shape[0]))
    alps, _ = run("alps", W0, H)
    _, wanda_mask = run("wanda", W0, H)
    sparsegpt, _ = run("sparsegpt", W0, H)
    assert best <= error(alps, W0, Hd) < 1.4 * best
    assert error(alps, W0, Hd) < error(least_squares(W0, Hd, ~wanda_mask), W0, Hd)
    assert error(alps, W0, Hd) < error(sparsegpt, W0, Hd)


@pytest.mark.parametrize("pattern,sparsity,group", [("unstructured", 0.7, "layer"), ("unstructured", 0.6, "row"),
                                                    ("2:4", 0.5, "row"), ("4:8", 0.5, "row"),
                                                    ("block:2", 0.5, "layer")])
def test_it_keeps_the_pattern_exactly(pattern, sparsity, group):
    W0, H = layer_problem(n_in=16, n_out=8)
    W, mask = run("alps", W0.float(), H.float(), pattern, sparsity, group)
    assert torch.equal(W == 0, mask)
    if group == "layer":
        assert int(mask.sum()) == int(sparsity * mask.numel())
    else:
        assert (mask.sum(1) == int(sparsity * 16)).all()
    if pattern.count(":") and not pattern.startswith("block"):
        n, m = map(int, pattern.split(":"))
        assert (mask.view(8, -1, m).sum(-1) == m - n).all()
    if pattern == "block:2":
        tiles = mask.view(4, 2, 8, 2).permute(0, 2, 1, 3).reshape(32, 4)
        assert ((tiles.sum(1) == 0) | (tiles.sum(1) == 4)).all()


def test_several_matrices_share_one_input():
    """q/k/v read the same input: pruned together they get what each gets alone."""
    W0, H = layer_problem(n_in=16, n_out=8)
    stats = InputStats(tokens=256, sq_norms=torch.diag(H).clone(), hessian=H.clone())
    target = LayerTarget(Pattern.parse("unstructured"), 0.5, "layer")
    method = get_method("alps")
    together = [W0.clone(), 2 * W0.flip(0)]
    masks = method.prune_many(together, stats, [target, target])
    for W, mask, start in zip(together, masks, [W0, 2 * W0.flip(0)]):
        alone = start.clone()
        assert torch.equal(method.prune(alone, stats, target), mask)
        assert torch.allclose(alone, W)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_alps_prunes_every_family(family, pattern, calib_ids):
    config = PruneConfig(method="alps", pattern=pattern, sparsity=0.6 if pattern == "unstructured" else None,
                         batch_size=2, options={"max_iters": 30})
    result = prune(tiny_model(family), config, calib_ids, progress=False)
    assert result.sparsity == pytest.approx(0.6 if pattern == "unstructured" else 0.5, abs=0.01)


def test_bad_options_are_refused():
    for options, match in [({"rho": 0.0}, "rho must be > 0"), ({"max_iters": 0}, "max_iters must be >= 1"),
                           ({"pcg_iters": -1}, "pcg_iters >= 0"), ({"percdamp": 1.0}, "percdamp must be in"),
                           ({"rho": "big"}, "rho must be float")]:
        with pytest.raises(ConfigError, match=match):
            get_method("alps", **options)


def test_cli_prunes_with_alps_and_its_options(tiny_dir, tmp_path):
    out = tmp_path / "out"
    code = main(["prune", *cli_args(tiny_dir, "--method", "alps", "--sparsity", "0.6", "--max-iters", "20",
                                    "--pcg-iters", "5", "--no-eval", "--output", str(out))])
    assert code == 0 and (out / "config.json").exists()
