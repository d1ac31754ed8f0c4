"""DSnoT: the vectorised refinement against a literal one-row-at-a-time reading of the paper's loop, its
invariants (weights per row, N:M groups, weights only zeroed or restored), and the engine, CLI and config."""

import math

import pytest
import torch

from conftest import FAMILIES, cli_args, tiny_model
from secateurs import ConfigError, PruneConfig, prune
from secateurs.cli import main
from secateurs.methods import InputStats
from secateurs.methods.dsnot import dsnot
from secateurs.patterns import Pattern, build_mask


def literal(W, W0, pruned, stats, pattern, cycles=50, threshold=0.1, power=1.0):
    """Each row on its own, with Python lists: grow the pruned weight at the matching end of the list sorted
    by W0 x̄ / Var^p, prune the kept weight with the lowest Wanda score whose removal moves e towards 0 (N:M: in
    the grown weight's group), until |e| <= threshold, a list runs out, or (N:M) e would change sign."""
    W, pruned = W.clone(), pruned.clone()
    n = stats.tokens
    mean = (stats.sums / n).tolist()
    var = [max(v, 0.0) for v in (stats.sq_norms / n - (stats.sums / n) ** 2).tolist()]
    norm = stats.sq_norms.sqrt().tolist()
    width = W.shape[1]
    for i in range(W.shape[0]):
        w, w0, out = W[i].tolist(), W0[i].tolist(), pruned[i].tolist()
        e = sum((w0[j] - w[j]) * mean[j] for j in range(width))
        sign0 = math.copysign(1, e) if e else 0
        key = {j: w0[j] * mean[j] / var[j] ** power for j in range(width) if out[j] and var[j] > 0}
        grow = sorted(key, key=lambda j: key[j])
        lo, hi = 0, len(grow) - 1
        wanda = [abs(w[j]) * norm[j] for j in range(width)]
        lowers = sorted((j for j in range(width) if not out[j] and w[j] * mean[j] < 0), key=lambda j: wanda[j])
        raises = sorted((j for j in range(width) if not out[j] and w[j] * mean[j] > 0), key=lambda j: wanda[j])
        swappable = {j for j in range(width) if not out[j]}
        for _ in range(cycles):
            if abs(e) <= threshold or lo > hi:
                break
            g = grow[hi] if e > 0 else grow[lo]
            if (key[g] > 0) != (e > 0) or key[g] == 0:
                break
            if pattern.kind == "nm":
                group = [j for j in range(g - g % pattern.m, g - g % pattern.m + pattern.m) if j in swappable]
                if not group:
                    break
                p = min(group, key=lambda j: wanda[j])
            else:
                pool = lowers if e > 0 else raises
                if not pool:
                    break
                p = pool[0]
            after = e + w[p] * mean[p] - w0[g] * mean[g]
            if pattern.kind == "nm" and (math.copysign(1, after) if after else 0) != sign0:
                break
            if pattern.kind == "nm":
                swappable.discard(p)
            else:
                pool.pop(0)
            if e > 0:
                hi -= 1
            else:
                lo += 1
            w[p], w[g], out[p], out[g], e = 0.0, w0[g], True, False, after
        W[i], pruned[i] = torch.tensor(w, dtype=W.dtype), torch.tensor(out)
    return W, pruned


def problem(rows=24, width=32, seed=0, pattern="unstructured", sparsity=0.6, tokens=64, updated=False):
    """A layer pruned by Wanda (or, ``updated``, with its kept weights moved as SparseGPT would), and its
    inputs' statistics, with non-zero channel means."""
    g = torch.Generator().manual_seed(seed)
    W0 = torch.randn(rows, width, generator=g, dtype=torch.float64)
    noise = torch.randn(tokens, width, generator=g, dtype=torch.float64)
    X = noise * torch.rand(width, generator=g, dtype=torch.float64) * 3 + torch.randn(width, generator=g,
                                                                                      dtype=torch.float64)
    stats = InputStats(tokens, sq_norms=(X * X).sum(0), sums=X.sum(0))
    pruned = build_mask(W0.abs() * stats.sq_norms.sqrt(), Pattern.parse(pattern), sparsity, "row")
    W = W0.masked_fill(pruned, 0)
    if updated:
        W = W + 0.1 * torch.randn(rows, width, generator=g, dtype=torch.float64).masked_fill(pruned, 0)
    return W, W0, pruned, stats, Pattern.parse(pattern)


@pytest.mark.parametrize("pattern,sparsity", [("unstructured", 0.6), ("unstructured", 0.8), ("2:4", 0.5),
                                              ("4:8", 0.5), ("1:4", 0.75)])
@pytest.mark.parametrize("updated", [False, True])
def test_it_is_the_literal_loop_row_by_row(pattern, sparsity, updated):
    for seed in range(3):
        W, W0, pruned, stats, pat = problem(seed=seed, pattern=pattern, sparsity=sparsity, updated=updated)
        got_W, got_mask = dsnot(W, W0, pruned, stats, pat, 50, 0.1)
        want_W, want_mask = literal(W, W0, pruned, stats, pat)
        assert torch.equal(got_mask, want_mask) and torch.allclose(got_W, want_W, rtol=0, atol=0)
        assert not torch.equal(got_mask, pruned)  # swaps happened: the oracle was exercised


def test_it_keeps_the_counts_the_groups_and_the_values():
    for pattern, sparsity in (("unstructured", 0.7), ("2:4", 0.5)):
        W, W0, pruned, stats, pat = problem(rows=64, width=64, pattern=pattern, sparsity=sparsity, updated=True)
        new_W, new_mask = dsnot(W, W0, pruned, stats, pat)
        assert torch.equal(new_mask.sum(1), pruned.sum(1))
        if pat.kind == "nm":
            assert bool((new_mask.view(64, -1, pat.m).sum(-1) == pat.m - pat.n).all())
        assert bool((new_W[new_mask] == 0).all())
        grown, kept = pruned & ~new_mask, ~pruned & ~new_mask
        assert grown.any() and torch.equal(new_W[grown], W0[grown]) and torch.equal(new_W[kept], W[kept])


def test_the_expected_output_error_shrinks():
    W, W0, pruned, stats, pat = problem(rows=256, width=128, sparsity=0.7)
    mean = stats.sums / stats.tokens
    before = ((W0 - W) @ mean).abs()
    new_W, _ = dsnot(W, W0, pruned, stats, pat)
    after = ((W0 - new_W) @ mean).abs()
    assert after.sum() < 0.5 * before.sum()


def test_a_row_already_close_enough_is_left_alone():
    W, W0, pruned, stats, pat = problem()
    new_W, new_mask = dsnot(W, W0, pruned, stats, pat, threshold=1e9)
    assert torch.equal(new_mask, pruned) and torch.equal(new_W, W)


def test_one_hand_made_row():
    """x̄ = (1, 1, 1, 1), Var = (1, 1, 4, 1); W0 = (3, 1, 2, -0.5), 2 of 4 pruned: (3, 1) kept by magnitude-ish,
    (2, -0.5) pruned.  e = 2 - 0.5 = 1.5 > 0: grow the largest W0 x̄ / Var among pruned, 2/4 = 0.5 against
    -0.5/1 -> grows index 2; prune the kept weight that lowers e -- none has W x̄ < 0, so the row stops."""
    W0 = torch.tensor([[3.0, 1.0, 2.0, -0.5]], dtype=torch.float64)
    mean = torch.ones(4, dtype=torch.float64)
    var = torch.tensor([1.0, 1.0, 4.0, 1.0], dtype=torch.float64)
    stats = InputStats(1, sq_norms=var + mean ** 2, sums=mean)
    pruned = torch.tensor([[False, False, True, True]])
    W = W0.masked_fill(pruned, 0)
    new_W, new_mask = dsnot(W, W0, pruned, stats, Pattern.parse("unstructured"))
    assert torch.equal(new_mask, pruned)  # no kept weight lowers e
    W0[0, 1] = -1.0  # now e = 1.5 and index 1 lowers it: grow 2 (e -> -0.5), prune 1 (e -> -1.5 ... )
    W = W0.masked_fill(pruned, 0)
    new_W, new_mask = dsnot(W, W0, pruned, stats, Pattern.parse("unstructured"), max_cycles=1)
    # one swap: e = 1.5 - 2 + (-1) = -1.5; index 2 grown, index 1 pruned
    assert new_mask.tolist() == [[False, True, False, True]]
    assert new_W.tolist() == [[3.0, 0.0, 2.0, 0.0]]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method,pattern", [("wanda", "unstructured"), ("sparsegpt", "2:4")])
def test_dsnot_refines_every_family(family, method, pattern, calib_ids):
    config = PruneConfig(method=method, pattern=pattern, sparsity=0.6 if pattern == "unstructured" else None,
                         batch_size=2)
    plain = prune(tiny_model(family), config, calib_ids, progress=False)
    model = tiny_model(family)
    refined = prune(model, config.override(refine="dsnot", refine_threshold=0.0), calib_ids, progress=False)
    assert refined.sparsity == pytest.approx(plain.sparsity, abs=1e-9)
    assert [r.zeros for r in refined.layers] == [r.zeros for r in plain.layers]


def test_dsnot_changes_the_mask_and_lowers_the_expected_output_error(calib_ids):
    """Wanda at 70% on a tiny Llama: with DSnoT some weights move, and the first block's layers (whose inputs
    both runs share) have a smaller expected output error on the calibration tokens, the quantity DSnoT lowers."""
    dense = tiny_model("llama")
    seen = {}
    dense.model.layers[0].self_attn.q_proj.register_forward_pre_hook(
        lambda module, args: seen.update(q_proj=args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        dense(calib_ids)
    config = PruneConfig(method="wanda", sparsity=0.7, batch_size=2)
    plain, refined = tiny_model("llama"), tiny_model("llama")
    prune(plain, config, calib_ids, progress=False)
    prune(refined, config.override(refine="dsnot", refine_threshold=0.0), calib_ids, progress=False)
    diffs = [int(((a == 0) != (b == 0)).sum()) for (n, a), (_, b) in
             zip(plain.named_parameters(), refined.named_parameters()) if ".layers." in n and a.ndim == 2]
    assert sum(diffs) > 0
    layer = dense.model.layers[0].self_attn.q_proj
    mean = seen["q_proj"].mean(0)
    with torch.no_grad():
        errors = [float(((layer.weight - m.model.layers[0].self_attn.q_proj.weight) @ mean).abs().sum())
                  for m in (plain, refined)]
    assert errors[1] < 0.8 * errors[0]


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="refine=dsnot swaps single weights"):
        PruneConfig(method="wanda", pattern="block:4", refine="dsnot")
    with pytest.raises(ConfigError, match="refine_threshold is read only with refine=dsnot"):
        PruneConfig(method="wanda", refine="admm", refine_threshold=0.2)
    with pytest.raises(ConfigError, match="refine_damp is read only with refine=admm"):
        PruneConfig(method="wanda", refine="dsnot", refine_damp=0.2)
    with pytest.raises(ConfigError, match="refine_threshold must be >= 0"):
        PruneConfig(method="wanda", refine="dsnot", refine_threshold=-1.0)
    assert PruneConfig(method="magnitude", refine="dsnot").needs == "norms"
    assert PruneConfig(method="sparsegpt", refine="dsnot").needs == "hessian"
    assert PruneConfig(method="wanda", refine="dsnot").resolved.refine_iters == 50


def test_cli_refines_with_dsnot_and_refuses_it_for_structured_methods(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["prune", *cli_args(tiny_dir, "--method", "wanda", "--sparsity", "0.6", "--refine", "dsnot",
                                    "--refine-iters", "10", "--no-eval", "--output", str(out))])
    assert code == 0 and (out / "config.json").exists()
    code = main(["prune", *cli_args(tiny_dir, "--method", "channels", "--ratio", "0.3", "--refine", "dsnot",
                                    "--no-eval", "--output", str(tmp_path / "o2"))])
    assert code == 2 and not (tmp_path / "o2").exists()
    assert "refine=dsnot refines the mask and weights a weight method" in capsys.readouterr().err


def test_only_the_attention_layers_are_refined_unless_asked(calib_ids):
    """The paper's code refines attention layers and leaves the MLP with the method's masks (its --skip_layer
    mlp default); refine_scope=all refines both, refine_scope=mlp the MLP alone.  Every layer is observed on
    the dense model's inputs (propagate=dense, all of a block at once), so a layer left alone gets Wanda's mask."""
    config = PruneConfig(method="wanda", sparsity=0.7, batch_size=2, propagate="dense")
    plain = tiny_model("llama")
    prune(plain, config, calib_ids, progress=False)
    dense = dict(plain.named_parameters())
    for scope, changed in [(None, {"attention"}), ("all", {"attention", "mlp"}), ("mlp", {"mlp"})]:
        model = tiny_model("llama")
        prune(model, config.override(refine="dsnot", refine_threshold=0.0, refine_scope=scope), calib_ids,
              progress=False)
        moved = {("attention" if "self_attn" in n else "mlp") for n, p in model.named_parameters()
                 if ".layers." in n and p.ndim == 2 and not torch.equal(p, dense[n])}
        assert moved == changed, scope


def test_refine_scope_is_checked():
    assert PruneConfig(method="wanda", refine="dsnot").resolved.refine_scope == "attention"
    with pytest.raises(ConfigError, match="refine_scope is read only with refine=dsnot"):
        PruneConfig(method="wanda", refine="admm", refine_scope="all")
    with pytest.raises(ConfigError, match="refine_scope must be one of"):
        PruneConfig(method="wanda", refine="dsnot", refine_scope="heads")


def test_the_threshold_is_on_a_sequences_summed_error_as_in_the_papers_code(monkeypatch):
    """The paper's code sums each channel's input over a sequence's tokens (averaged over sequences), so its
    row error is seqlen times the per-token one dsnot() works with: the engine divides the threshold by seqlen."""
    from secateurs.engine import sequential

    seen = {}
    monkeypatch.setattr(sequential, "dsnot", lambda *args: seen.update(threshold=args[6]) or (args[0], args[2]))
    refine = sequential.refiner(PruneConfig(method="wanda", refine="dsnot", refine_threshold=0.1), seqlen=512)
    W = torch.zeros(2, 4)
    refine(W, W, InputStats(), W == 0, Pattern.parse("unstructured"), ["model.layers.0.self_attn.q_proj"])
    assert seen["threshold"] == pytest.approx(0.1 / 512)
