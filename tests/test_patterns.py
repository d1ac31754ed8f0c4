import pytest
import torch

from secateurs.patterns import (Pattern, block_mask, build_mask, check_nm, check_tiles, kth_smallest,
                                lowest_in_groups, lowest_k_mask, nm_mask, unstructured_mask, zero_where_)


def test_parse_patterns():
    assert Pattern.parse("unstructured") == Pattern("unstructured")
    p = Pattern.parse("2:4")
    assert (p.kind, p.n, p.m, p.implied_sparsity, str(p)) == ("nm", 2, 4, 0.5, "2:4")
    assert Pattern.parse("4:8").implied_sparsity == 0.5
    assert Pattern.parse("1:4").implied_sparsity == 0.75
    assert Pattern.parse("block:16") == Pattern("block", block=16)


@pytest.mark.parametrize("bad", ["4:4", "5:4", "0:4", "2-4", "block:0", "blocky", "", "magic"])
def test_parse_rejects(bad):
    with pytest.raises(ValueError):
        Pattern.parse(bad)


def test_validate_shape():
    Pattern.parse("2:4").validate_shape(8, 12)
    with pytest.raises(ValueError, match="not divisible by M=8"):
        Pattern.parse("4:8").validate_shape(8, 12)
    with pytest.raises(ValueError, match="does not tile"):
        Pattern.parse("block:4").validate_shape(6, 8)


def test_lowest_k_mask_exact_with_ties():
    s = torch.tensor([[3.0, 1.0, 2.0, 1.0, 5.0],
                      [2.0, 2.0, 2.0, 2.0, 0.0]])
    # k=2: row 0 takes both 1.0s; row 1 takes 0.0 and the lowest-index 2.0
    assert lowest_k_mask(s, 2).tolist() == [[False, True, False, True, False],
                                            [True, False, False, False, True]]
    assert lowest_k_mask(s, 0).sum() == 0
    assert lowest_k_mask(s, 5).all()


def test_unstructured_row_and_layer():
    s = torch.tensor([[1.0, 2.0, 3.0, 4.0],
                      [10.0, 20.0, 30.0, 40.0]])
    assert unstructured_mask(s, 0.5, "row").tolist() == [[True, True, False, False], [True, True, False, False]]
    assert unstructured_mask(s, 0.5, "layer").tolist() == [[True, True, True, True], [False, False, False, False]]
    # int(4 * 0.3) = 1 per row
    assert unstructured_mask(s, 0.3, "row").sum() == 2


def test_nm_mask_exact():
    s = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.5, 0.1, 0.9, 0.7],
                      [1.0, 1.0, 1.0, 1.0, 9.0, 8.0, 7.0, 6.0]])
    # 2:4 prunes the two lowest of every four; ties prune the lower index first
    assert nm_mask(s, 2, 4).tolist() == [[False, True, False, True, True, True, False, False],
                                         [True, True, False, False, False, False, True, True]]
    # 1:4 keeps only the largest
    assert nm_mask(s, 1, 4).sum(1).tolist() == [6, 6]
    assert nm_mask(s, 1, 4)[0].tolist() == [False, True, True, True, True, True, False, True]


@pytest.mark.parametrize("chunk", [2**22, 200])  # 200 values: a few rows at a time, and a last short chunk
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_kth_smallest_equals_kthvalue(dtype, chunk, monkeypatch):
    # NumPy's selection on the CPU (float32/64) and torch.kthvalue (bfloat16) must give the same values
    monkeypatch.setattr("secateurs.patterns._CHUNK", chunk)
    torch.manual_seed(0)
    for scores in (torch.randn(40, 96), torch.randint(0, 4, (40, 96)).float(), torch.randn(1, 5000)):
        scores = scores.to(dtype)
        for k in (1, 7, scores.shape[1] // 2, scores.shape[1]):
            got = kth_smallest(scores, k)
            assert got.shape == (scores.shape[0], 1) and got.dtype == dtype
            assert torch.equal(got, torch.kthvalue(scores, k, dim=1, keepdim=True).values)
    assert kth_smallest(torch.tensor([[3.0, 1.0, 2.0, 1.0]]), 2).item() == 1.0  # ties count once each


def test_lowest_in_groups_exact():
    g = torch.tensor([[4.0, 1.0, 0.0], [1.0, 1.0, 0.0], [3.0, 5.0, 0.0], [2.0, 0.0, 0.0]])  # one group per column
    assert lowest_in_groups(g, 2).t().tolist() == [[False, True, False, True],   # 1 and 2
                                                   [True, False, False, True],   # 0, then the first of the tied 1s
                                                   [True, True, False, False]]   # all tied: the lowest indices


@pytest.mark.parametrize("m", [2, 4, 8, 16])
@pytest.mark.parametrize("count", [100, 2000])
def test_lowest_in_groups_equals_a_stable_sort(m, count):
    """Every way of counting -- NumPy on the CPU, torch (what a GPU runs), the sort for m > 8 -- must give the
    stable sort's choice, ties included."""
    from secateurs.patterns import _count_before

    torch.manual_seed(m)
    for scores in (torch.rand(m, count), torch.randint(0, 3, (m, count)).float(),
                   torch.randint(0, 3, (m, count)).double(), torch.rand(m, count).half()):  # half: torch counts
        for k in range(m + 1):
            order = torch.argsort(scores, dim=0, stable=True)[:k]
            expect = torch.zeros_like(scores, dtype=torch.bool).scatter_(0, order, True)
            assert torch.equal(lowest_in_groups(scores, k), expect)
            assert torch.equal(lowest_in_groups(scores.t().contiguous().t(), k), expect)  # strided, as nm_mask uses
            assert torch.equal(_count_before(scores, torch.zeros_like(scores, dtype=torch.uint8)) < k, expect)


def test_block_mask_exact():
    s = torch.tensor([[1.0, 1.0, 9.0, 9.0],
                      [1.0, 1.0, 9.0, 9.0],
                      [8.0, 8.0, 0.0, 0.0],
                      [8.0, 8.0, 0.0, 1.0]])
    got = block_mask(s, 2, 0.5, "row")
    assert got.tolist() == [[True, True, False, False], [True, True, False, False],
                            [False, False, True, True], [False, False, True, True]]
    layer = block_mask(s, 2, 0.25, "layer")  # one tile of four: the all-zero-ish bottom right (sum 1)
    assert layer.sum() == 4 and layer[2:, 2:].all()
    assert check_tiles(got, 2) == 0
    assert check_tiles(torch.tensor([[True, False], [False, False]]), 2) == 1


def test_build_mask_dispatch_and_check_nm():
    torch.manual_seed(0)
    s = torch.rand(8, 16)
    m = build_mask(s, Pattern.parse("2:4"), 0.5)
    W = torch.randn(8, 16).masked_fill(m, 0)
    assert check_nm(W, 2, 4) == 0
    W[0, :4] = 1.0  # four non-zeros in one group of four
    assert check_nm(W, 2, 4) == 1
    assert build_mask(s, Pattern.parse("unstructured"), 0.25, "layer").sum() == 32


def test_lowest_k_mask_matches_a_stable_sort_under_heavy_ties():
    """Small integer scores tie everywhere: only rows with surplus ties take the trimming path."""
    g = torch.Generator().manual_seed(0)
    s = torch.randint(0, 6, (64, 40), generator=g).float()
    s[:8] = torch.randperm(40, generator=g).float()  # tie-free rows take the fast path
    for k in (1, 7, 20, 39):
        order = torch.argsort(s, dim=1, stable=True)[:, :k]
        expected = torch.zeros_like(s, dtype=torch.bool).scatter_(1, order, True)
        got = lowest_k_mask(s, k)
        assert torch.equal(got, expected), k
        assert (got.sum(1) == k).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_zero_where_is_masked_fill_bit_for_bit(dtype):
    g = torch.Generator().manual_seed(1)
    W = torch.randn(16, 24, generator=g).to(dtype)
    W[0, :4] = torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0]).to(dtype)
    mask = torch.rand(16, 24, generator=g) < 0.5
    mask[0, :4] = True  # inf, -inf, nan and -0.0 are pruned: each must become +0.0, not nan or -0.0
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[W.element_size()]
    expected = W.clone().masked_fill_(mask, 0)
    got = zero_where_(W, mask)
    assert got is W
    assert torch.equal(W.view(bits), expected.view(bits))
    assert (W.view(bits)[mask] == 0).all()


def test_zero_where_on_a_strided_view_and_a_non_float_tensor():
    base = torch.randn(12, 8)
    view = base.t()[2:6]  # (4, 12), not contiguous: the writes land in base
    mask = torch.rand(view.shape) < 0.5
    expected = base.clone()
    expected.t()[2:6].masked_fill_(mask, 0)
    zero_where_(view, mask)
    assert torch.equal(base.view(torch.int32), expected.view(torch.int32))
    ints = torch.arange(6).reshape(2, 3)
    assert zero_where_(ints, ints % 2 == 1).tolist() == [[0, 0, 2], [0, 4, 0]]
