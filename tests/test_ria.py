"""RIA: relative importance times tempered activations, against its formula computed by hand; its channel
permutation against brute force."""

import itertools
import json

import pytest
import torch

from conftest import FAMILIES, cli_args, tiny_model
from secateurs import ConfigError, PruneConfig, load, prune, save_model
from secateurs.cli import main
from secateurs.engine.sequential import verify_layer
from secateurs.errors import ModelLoadError, VerificationError
from secateurs.export import sparse
from secateurs.export.compressed import compressible, decompress
from secateurs.methods import InputStats, LayerTarget, Pruned, get_method
from secateurs.methods.ria import channel_order, exchange_slot, kept_score, reallocated
from secateurs.models.arch import weight_of
from secateurs.patterns import Pattern, check_nm


def test_the_scores_and_the_mask_are_the_papers():
    g = torch.Generator().manual_seed(0)
    W, sq = torch.randn(12, 16, generator=g), torch.rand(16, generator=g) * 10
    want = (W.abs() / W.abs().sum(0) + W.abs() / W.abs().sum(1, keepdim=True)) * sq.sqrt() ** 0.5
    method = get_method("ria")
    torch.testing.assert_close(method.scores(W.clone(), InputStats(sq_norms=sq)), want)
    pruned = W.clone()
    mask = method.prune(pruned, InputStats(sq_norms=sq), LayerTarget(Pattern.parse("unstructured"), 0.5))
    # per output row, the half with the lowest scores goes (ties: none among random floats)
    lowest = want.argsort(dim=1)[:, :8]
    assert torch.equal(mask, torch.zeros_like(mask).scatter_(1, lowest, True)) and bool((pruned[mask] == 0).all())
    assert torch.testing.assert_close(get_method("ria", norm_power=1.0).scores(W.clone(), InputStats(sq_norms=sq)),
                                      want / sq.sqrt() ** 0.5 * sq.sqrt()) is None


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_ria_prunes_every_family(family, pattern, calib_ids):
    result = prune(tiny_model(family), PruneConfig(method="ria", pattern=pattern, batch_size=2), calib_ids,
                   progress=False)
    assert result.sparsity == pytest.approx(0.5, abs=1e-9)


def test_a_power_out_of_range_is_refused():
    with pytest.raises(ConfigError, match=r"norm_power must be in \[0, 2\]"):
        PruneConfig(method="ria", options={"norm_power": 3.0})


# ------------------------------------------------------------------------------------------ channel permutation


def test_reallocation_deals_the_sorted_channels_into_the_slots_in_a_zigzag():
    S = torch.tensor([[float(v) for v in [7, 0, 5, 2, 6, 1, 4, 3]]])  # channel j's summed score: S[0, j]
    # ascending: 1 5 3 7 | 6 2 4 0; 2 groups of 4 slots: slot 0 <- 1 5, slot 1 <- 3 7 reversed, slot 2 <- 6 2 ...
    assert reallocated(S, 4).tolist() == [1, 7, 6, 0, 5, 3, 2, 4]


@pytest.mark.parametrize("n, m, seed", [(2, 4, 0), (2, 4, 1), (1, 4, 2), (3, 4, 3), (2, 3, 4)])
def test_one_exchange_is_the_best_of_every_assignment_of_its_slot(n, m, seed):
    g = torch.Generator().manual_seed(seed)
    S = torch.rand(9, 5 * m, generator=g) ** 3
    order = torch.randperm(5 * m, generator=g)
    for c in range(m):
        slots = order.view(5, m)
        best = max(kept_score(S[:, _with_slot(slots, c, p)], n, m) for p in itertools.permutations(range(5)))
        got = exchange_slot(S, order, n, m, c)
        assert sorted(got.tolist()) == list(range(5 * m))
        assert kept_score(S[:, got], n, m) == pytest.approx(best, rel=1e-6)


def _with_slot(slots, c, p):
    out = slots.clone()
    out[:, c] = slots[list(p), c]
    return out.reshape(-1)


@pytest.mark.parametrize("seed", range(4))
def test_the_order_keeps_at_least_what_the_given_order_and_the_reallocation_keep(seed):
    g = torch.Generator().manual_seed(seed)
    S = torch.rand(32, 64, generator=g) ** 4
    order = channel_order(S, 2, 4)
    assert sorted(order.tolist()) == list(range(64))
    got = kept_score(S[:, order], 2, 4)
    assert got >= kept_score(S, 2, 4) and got >= kept_score(S[:, reallocated(S, 4)], 2, 4)
    assert got > kept_score(S, 2, 4) * 1.01  # random channels leave room: the search finds some of it


def test_a_permuted_mask_is_n_m_in_its_order_and_keeps_more_score_than_plain_n_m():
    g = torch.Generator().manual_seed(5)
    W, sq = torch.randn(24, 64, generator=g), torch.rand(64, generator=g) * 10
    stats, target = InputStats(sq_norms=sq), LayerTarget(Pattern.parse("2:4"), 0.5)
    S = get_method("ria").scores(W.clone(), stats)
    plain = get_method("ria").prune(W.clone(), stats, target)
    pruned = W.clone()
    out = get_method("ria", permute=True).prune(pruned, stats, target)
    assert isinstance(out, Pruned) and sorted(out.order.tolist()) == list(range(64))
    assert check_nm(pruned[:, out.order], 2, 4) == 0 and int(out.mask.sum()) == W.numel() // 2
    assert torch.equal(pruned, W.masked_fill(out.mask, 0))
    assert float(S[~out.mask].sum()) > float(S[~plain].sum())
    assert verify_layer("w", pruned, out.mask, target, True, out.order) == (W.numel() // 2, W.numel() // 2)
    with pytest.raises(VerificationError, match="2:4 pattern"):  # the same weight in its own order breaks 2:4
        verify_layer("w", pruned, out.mask, target, True)
    with pytest.raises(VerificationError, match="not a permutation"):
        verify_layer("w", pruned, out.mask, target, True, torch.zeros(64, dtype=torch.long))


@pytest.mark.parametrize("family", FAMILIES)
def test_ria_permute_prunes_every_family_to_n_m_in_each_recorded_order(family, calib_ids):
    model = tiny_model(family)
    result = prune(model, PruneConfig(method="ria", pattern="2:4", options={"permute": True}, batch_size=2),
                   calib_ids, progress=False)
    assert result.sparsity == pytest.approx(0.5, abs=1e-9)
    for r in result.layers:
        W = weight_of(model.get_submodule(r.name))
        assert r.order is not None and check_nm(W[:, list(r.order)], 2, 4) == 0


@pytest.mark.parametrize("quant", [None, "int4"])
def test_a_permuted_n_m_checkpoint_is_stored_as_n_m_groups_with_its_order_and_round_trips(quant, calib_ids,
                                                                                          tmp_path):
    model = tiny_model("llama").to(torch.bfloat16)
    extra = {"quant": quant, "group_size": 32} if quant else {}
    result = prune(model, PruneConfig(method="ria", pattern="2:4", options={"permute": True}, batch_size=3, **extra),
                   calib_ids, progress=False)
    save_model(model, None, tmp_path / "sparse", compress=compressible(result))
    tensors = json.loads((tmp_path / "sparse" / "config.json").read_text())["secateurs_sparsity"]["tensors"]
    assert {(e["encoding"], e.get("permuted")) for e in tensors.values()} == {("n:m", True)}
    memory = {k: v for k, v in model.state_dict().items() if not k.endswith("weight_scale")}
    loaded = load(tmp_path / "sparse")[0].state_dict()
    assert all(torch.equal(loaded[k].view(torch.int16), memory[k].view(torch.int16)) for k in memory)
    decompress(tmp_path / "sparse", tmp_path / "back")
    assert all(torch.equal(v.view(torch.int16), memory[k].view(torch.int16))
               for k, v in load(tmp_path / "back")[0].state_dict().items())


def test_a_damaged_order_is_refused():
    W = torch.tensor([[1.0, 2.0, 3.0, 0.0, 0.0, 0.0, 0.0, 4.0]]).repeat(64, 1)  # its own order: 3 kept in 4
    order = [0, 1, 3, 4, 2, 5, 6, 7]  # the groups {0,1,3,4} and {2,5,6,7} each keep two
    entry = sparse.choose(W, [(2, 4)], order=order)
    assert entry["encoding"] == "n:m" and entry["permuted"] and not sparse.fits_nm(W, 2, 4)
    parts = sparse.encode(W, entry, order=order)
    assert torch.equal(sparse.decode("w", entry, parts), W)
    parts["order"] = torch.zeros(8, dtype=torch.int32)
    with pytest.raises(ModelLoadError, match="w.order is not a permutation"):
        sparse.decode("w", entry, parts)


@pytest.mark.parametrize("flags, message", [
    (["--pattern", "unstructured"], "ria permute reorders input channels for N:M groups"),
    (["--pattern", "2:4", "--refine", "dsnot"], "would break a permuted N:M mask")])
def test_permute_is_refused_where_it_does_not_apply(flags, message, tiny_dir, tmp_path, capsys):
    assert main(["prune", *cli_args(tiny_dir, "--method", "ria", "--permute", *flags),
                 "--output", str(tmp_path / "out")]) != 0
    assert message in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_the_cli_saves_a_permuted_model_sparse(tiny_dir, tmp_path, capsys):
    assert main(["prune", *cli_args(tiny_dir, "--method", "ria", "--pattern", "2:4", "--permute"),
                 "--save-format", "sparse", "--output", str(tmp_path / "out"),
                 "--report", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["storage"]["encoded"]["encodings"] == {"n:m": 14}
