import pytest
import torch

from secateurs.methods import InputStats, LayerTarget, get_method
from secateurs.methods.reconstruct import admm_reconstruct
from secateurs.methods.sparsegpt import inverse_factor, sparsegpt_prune
from secateurs.patterns import Pattern, check_nm

UNSTRUCTURED = Pattern.parse("unstructured")


def test_magnitude_per_layer_and_row_exact():
    W = torch.tensor([[1.0, -5.0, 2.0, 0.5],
                      [-3.0, 4.0, -0.1, 6.0]])
    layer = get_method("magnitude").prune(W.clone(), InputStats(), LayerTarget(UNSTRUCTURED, 0.5, "layer"))
    # the four smallest |w| of the whole matrix: 0.1, 0.5, 1, 2
    assert layer.tolist() == [[True, False, True, True], [False, False, True, False]]
    W2 = W.clone()
    row = get_method("magnitude").prune(W2, InputStats(), LayerTarget(UNSTRUCTURED, 0.5, "row"))
    assert row.tolist() == [[True, False, False, True], [True, False, True, False]]
    assert W2.tolist() == [[0.0, -5.0, 2.0, 0.0], [0.0, 4.0, 0.0, 6.0]]


def test_magnitude_threshold_mode():
    W = torch.tensor([[0.05, -0.2, 0.3], [-0.01, 0.15, -0.5]])
    mask = get_method("magnitude", threshold=0.16).prune(W, InputStats(), LayerTarget(UNSTRUCTURED, 0.0))
    assert mask.tolist() == [[True, False, False], [True, True, False]]
    assert torch.equal(W, torch.tensor([[0.0, -0.2, 0.3], [0.0, 0.0, -0.5]]))


def test_wanda_scores_exact():
    W = torch.tensor([[1.0, -2.0, 3.0],
                      [-4.0, 0.5, 1.0]])
    # inputs: channel norms ||X_j||_2 = sqrt(sq_norms) = 2, 1, 0.5
    stats = InputStats(tokens=4, sq_norms=torch.tensor([4.0, 1.0, 0.25]))
    wanda = get_method("wanda")
    assert wanda.scores(W, stats).tolist() == [[2.0, 2.0, 1.5], [8.0, 0.5, 0.5]]
    mask = wanda.prune(W, stats, LayerTarget(UNSTRUCTURED, 1 / 3, "row"))  # int(3 * 1/3) = 1 per row
    # row 0: the lowest score is 1.5 (w=3, large weight, quiet channel); row 1: tie 0.5/0.5, lower index
    assert mask.tolist() == [[False, False, True], [False, True, False]]


def test_wanda_differs_from_magnitude():
    W = torch.tensor([[1.0, 2.0]])
    stats = InputStats(tokens=1, sq_norms=torch.tensor([100.0, 1.0]))
    t = LayerTarget(UNSTRUCTURED, 0.5, "row")
    assert get_method("wanda").prune(W.clone(), stats, t).tolist() == [[False, True]]
    assert get_method("magnitude").prune(W.clone(), stats, t).tolist() == [[True, False]]


def _hessian(n_in=16, tokens=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n_in, n_in, generator=g) * 0.5 + torch.eye(n_in)  # correlated input channels
    X = torch.randn(tokens, n_in, generator=g) @ mix
    return X.double(), (X.t() @ X).double()


def direct_obs(W, H, mask, percdamp):
    """Textbook OBS in column order with an explicit inverse at every step (no Cholesky, no laziness).

    At column q the not-yet-visited columns F = {q..n-1} are free; pruning w_q updates them by
    -(w_q / [H_F^-1]_qq) * H_F^-1[q, :].
    """
    W = W.clone()
    n = W.shape[1]
    H = H + percdamp * torch.diag(H).mean() * torch.eye(n, dtype=H.dtype)
    for q in range(n):
        Hinv = torch.linalg.inv(H[q:, q:])
        for r in range(W.shape[0]):
            if mask[r, q]:
                W[r, q:] -= W[r, q] / Hinv[0, 0] * Hinv[0, :]
                W[r, q] = 0.0
    return W


@pytest.mark.parametrize("blocksize", [3, 16, 128])
def test_sparsegpt_matches_direct_obs(blocksize):
    _, H = _hessian()
    g = torch.Generator().manual_seed(1)
    W = torch.randn(5, 16, generator=g, dtype=torch.float64)
    got = W.clone()
    mask = sparsegpt_prune(got, H, UNSTRUCTURED, 0.5, blocksize=blocksize, percdamp=0.01)
    want = direct_obs(W, H, mask, 0.01)
    assert torch.allclose(got, want, atol=1e-9)
    assert (got[mask] == 0).all()
    # the layer's pruned count follows the per-block rule int(rows * cols_in_block * sparsity)
    assert int(mask.sum()) == sum(int(5 * min(blocksize, 16 - i) * 0.5) for i in range(0, 16, blocksize))


def test_sparsegpt_mask_selection_is_obs_saliency():
    """With one block the mask is the lowest w^2 / [H_F^-1]_qq over the block, F the columns from q on."""
    _, H = _hessian()
    W = torch.randn(4, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    Hd = H + 0.01 * torch.diag(H).mean() * torch.eye(16, dtype=H.dtype)
    d2 = torch.tensor([torch.linalg.inv(Hd[q:, q:])[0, 0] for q in range(16)], dtype=H.dtype)
    saliency = W**2 / d2
    want = saliency <= saliency.flatten().kthvalue(32).values
    mask = sparsegpt_prune(W.clone(), H, UNSTRUCTURED, 0.5, blocksize=16)
    assert torch.equal(mask, want)


def test_sparsegpt_reconstructs_better_than_magnitude_and_wanda():
    """Same density, layer reconstruction error ||(W - W') X^T||^2: OBS updates win by far when the inputs
    are nearly low-rank (as LLM activations are), Wanda beats magnitude."""
    g = torch.Generator().manual_seed(3)
    X = (torch.randn(512, 4, generator=g) @ torch.randn(4, 32, generator=g) + 0.1 * torch.randn(512, 32, generator=g)).double()
    H = X.t() @ X
    W = torch.randn(16, 32, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    stats = InputStats(tokens=512, sq_norms=torch.diag(H), hessian=H)
    errors = {}
    for name in ("magnitude", "wanda", "sparsegpt"):
        Wp = W.clone()
        mask = get_method(name).prune(Wp, stats, LayerTarget(UNSTRUCTURED, 0.5, "row"))
        assert mask.sum() == 256 and (Wp == 0).sum() == 256
        errors[name] = float(((W - Wp) @ X.t()).pow(2).sum())
    assert errors["sparsegpt"] < 0.1 * errors["wanda"]
    assert errors["wanda"] < 0.8 * errors["magnitude"]


def test_sparsegpt_nm_and_block_patterns():
    _, H = _hessian(n_in=32, tokens=512)
    W = torch.randn(8, 32, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    Wn = W.clone()
    sparsegpt_prune(Wn, H, Pattern.parse("2:4"), 0.5, blocksize=8)
    assert check_nm(Wn, 2, 4) == 0 and int((Wn == 0).sum()) == 128
    Wb = W.clone()
    mask = sparsegpt_prune(Wb, H, Pattern.parse("block:4"), 0.5, blocksize=16)
    tiles = mask.reshape(2, 4, 8, 4).sum(dim=(1, 3))
    assert set(tiles.flatten().tolist()) <= {0, 16} and int(mask.sum()) == 128


def test_sparsegpt_dead_inputs_and_damping_retry(caplog):
    _, H = _hessian(n_in=8)
    H[3, :] = 0
    H[:, 3] = 0  # channel 3 never fires
    W = torch.ones(2, 8, dtype=torch.float64)
    sparsegpt_prune(W, H, UNSTRUCTURED, 0.25)
    assert (W[:, 3] == 0).all()
    # an indefinite matrix needs more damping: the retry is logged
    bad = torch.eye(4, dtype=torch.float64)
    bad[0, 0] = -0.5
    bad[1, 0] = bad[0, 1] = 0.25
    before = bad.clone()
    with caplog.at_level("WARNING"), inverse_factor(bad, 0.01) as F:
        U = torch.triu(F)
    assert "retrying" in caplog.text and "succeeded after raising damping to 1" in caplog.text
    damped = before + 1.0 * torch.diag(before).mean() * torch.eye(4, dtype=torch.float64)  # 0.01 x 10 x 10
    assert torch.allclose(U.t() @ U, torch.linalg.inv(damped), rtol=1e-10)
    assert torch.equal(bad, before)  # the failed factorisations were undone


def test_inverse_cholesky_factor():
    """Inside the ``with``, H's storage holds U (upper, U^T U = damped H^-1) above the diagonal and H's own
    strictly lower triangle below it; afterwards H is back bit for bit -- after an error in the body, too."""
    _, H = _hessian(n_in=24)
    before = H.clone()
    Hd = H + 0.01 * torch.diag(H).mean() * torch.eye(24, dtype=H.dtype)
    with inverse_factor(H, 0.01) as F:
        assert F.data_ptr() == before.data_ptr() or F is H
        U = torch.triu(F)
        assert torch.equal(torch.tril(F, -1), torch.tril(before, -1))
    assert torch.allclose(U.t() @ U, torch.linalg.inv(Hd), rtol=1e-8, atol=1e-12)
    assert torch.equal(H, before)
    with pytest.raises(ZeroDivisionError), inverse_factor(H, 0.01):
        1 / 0
    assert torch.equal(H, before)


def test_the_in_place_inverse_factor_equals_the_plain_one():
    """Built in place, a block of columns at a time, with dead channels: flip -> cholesky -> triangular inverse
    -> flip of torch.linalg to float32 rounding, for widths below, at and across the block size."""
    for n in (7, 130, 256, 513):
        _, H = _hessian(n_in=n)
        H = H.float()
        H = torch.tril(H) + torch.tril(H, -1).t()  # exactly symmetric, as the engine's are
        H[2, :] = H[:, 2] = 0
        before = H.clone()
        dead = torch.diag(H) == 0
        plain = H.clone()
        plain[dead, dead] = 1
        A = plain.flip(0, 1)
        A.diagonal().add_(0.01 * torch.mean(torch.diag(plain)))
        L = torch.linalg.cholesky(A)
        expected = torch.linalg.solve_triangular(L, torch.eye(n), upper=False).flip(0, 1)
        with inverse_factor(H, 0.01, dead) as F:
            got = torch.triu(F)
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
        assert torch.equal(H, before)


def test_in_place_factorisations_touch_only_the_lower_triangle():
    from secateurs.linalg import cholesky_lower_, invert_lower_, reverse_

    for n, block in ((9, 4), (40, 16), (64, 64), (100, 256)):
        _, H = _hessian(n_in=n)
        A = torch.tril(H) + torch.triu(torch.full_like(H, 7.0), 1)  # above the diagonal: never read nor written
        upper = torch.triu(A, 1)
        assert cholesky_lower_(A, block) == 0
        L = torch.tril(A)
        assert torch.allclose(L, torch.linalg.cholesky(H), rtol=1e-10, atol=1e-10)
        assert torch.equal(torch.triu(A, 1), upper)
        invert_lower_(A, block)
        assert torch.allclose(torch.tril(A), torch.linalg.inv(L), rtol=1e-9, atol=1e-9)
        assert torch.equal(torch.triu(A, 1), upper)
    bad = torch.eye(6, dtype=torch.float64)
    bad[4, 4] = -1.0
    assert cholesky_lower_(bad.clone(), 2) == 5  # the 1-based column where it stopped, as LAPACK says it
    for shape, chunk in (((5, 7), 3), ((6, 6), 1), ((9, 4), 100)):
        M = torch.randn(shape)
        for m in (M.clone(), M.t().contiguous().t()):  # row- and column-major
            assert torch.equal(reverse_(m, chunk), M.flip(0, 1))


def test_sparsegpt_prunes_layers_that_share_an_input_as_if_one_by_one():
    """q/k/v (or gate/up) share one inverse factor; each keeps its own target (here its own pattern too)."""
    _, H = _hessian(n_in=32, tokens=512)
    g = torch.Generator().manual_seed(8)
    Ws = [torch.randn(r, 32, generator=g, dtype=torch.float64) for r in (6, 3)]
    targets = [LayerTarget(UNSTRUCTURED, 0.5, "lazy-batch"), LayerTarget(Pattern.parse("2:4"), 0.5, "lazy-batch")]
    method = get_method("sparsegpt", blocksize=16)
    together = [W.clone() for W in Ws]
    masks = method.prune_many(together, InputStats(hessian=H), targets)
    for W, got, mask, t in zip(Ws, together, masks, targets):
        alone = W.clone()
        assert torch.equal(mask, sparsegpt_prune(alone, H, t.pattern, t.sparsity, blocksize=16))
        assert torch.allclose(got, alone, rtol=0, atol=1e-12)


def masked_least_squares(W0, H, keep, damp):
    """Row by row, the exact minimiser of (w - w0)^T H_d (w - w0) with w = 0 off ``keep``, H_d = H + damp Diag(H):
    w_S = w0_S + H_d[S, S]^-1 H_d[S, P] w0_P (S kept, P pruned)."""
    Hd = H + damp * torch.diag(torch.diag(H))
    out = torch.zeros_like(W0)
    for r in range(W0.shape[0]):
        S, P = keep[r], ~keep[r]
        out[r, S] = W0[r, S] + torch.linalg.solve(Hd[S][:, S], Hd[S][:, P] @ W0[r, P])
    return out


@pytest.mark.parametrize("damp", [0.0, 0.1])
def test_admm_reaches_the_exact_masked_least_squares(damp):
    _, H = _hessian(n_in=16, tokens=256)
    W0 = torch.randn(6, 16, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    keep = ~get_method("magnitude").prune(W0.clone(), InputStats(), LayerTarget(Pattern.parse("2:4"), 0.5, "row"))
    got = admm_reconstruct(W0 * keep, W0, H, keep, iters=400, damp=damp)
    assert (got[~keep] == 0).all()
    assert torch.allclose(got, masked_least_squares(W0, H, keep, damp), atol=1e-6)
    chunked = admm_reconstruct(W0 * keep, W0, H, keep, iters=400, damp=damp, chunk_rows=4)  # rows 0-3, then 4-5
    assert torch.allclose(chunked, got, rtol=0, atol=1e-12)


def test_admm_lowers_sparsegpt_reconstruction_error():
    """SparseGPT never revisits a column it has passed; re-fitting every kept weight on its mask does better."""
    _, H = _hessian(n_in=32, tokens=512)
    W0 = torch.randn(8, 32, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    W = W0.clone()
    mask = sparsegpt_prune(W, H, Pattern.parse("2:4"), 0.5, blocksize=32, percdamp=0.01)

    def error(Wp):
        return float(torch.einsum("ij,jk,ik->", W0 - Wp, H, W0 - Wp))

    refined = admm_reconstruct(W, W0, H, ~mask, iters=20, damp=0.0)
    assert check_nm(refined, 2, 4) == 0 and (refined[mask] == 0).all()
    best = error(masked_least_squares(W0, H, ~mask, 0.0))
    assert best < 0.7 * error(W)  # SparseGPT's weights are far from the optimum on their own mask
    assert best - 1e-9 <= error(refined) < 1.01 * best  # 20 iterations come within 1% of it


def test_admm_with_a_dead_input_channel_stays_finite():
    _, H = _hessian(n_in=8, tokens=64)
    H[3, :] = 0
    H[:, 3] = 0  # channel 3 never active
    W0 = torch.randn(4, 8, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    keep = torch.rand(4, 8, generator=torch.Generator().manual_seed(9)) > 0.5
    for damp in (0.0, 0.1):
        got = admm_reconstruct(W0 * keep, W0, H, keep, iters=400, damp=damp)
        assert torch.isfinite(got).all() and (got[~keep] == 0).all()
        live = [i for i in range(8) if i != 3]  # on the live channels it is still the exact optimum
        want = masked_least_squares(W0[:, live], H[live][:, live], keep[:, live], damp)
        assert torch.allclose(got[:, live], want, atol=1e-6)


def test_a_new_method_with_an_option_needs_only_its_own_file(tiny_dir, tmp_path, request):
    """Registering a method is the only edit: its option reaches the CLI flags, recipes, compare and the config."""
    import json

    from conftest import cli_args
    from secateurs import METHODS, Method, PruneConfig, register
    from secateurs.cli import build_parser, main
    from secateurs.errors import ConfigError

    import secateurs.api as api_module

    request.addfinalizer(lambda: METHODS.pop("wanda-power", None))  # registered for this test only

    @register("wanda-power")
    class WandaPower(Method):
        needs = "norms"
        help = {"power": "exponent of the input norm (Wanda: 1)"}

        def __init__(self, power: float = 1.0):
            if power <= 0:
                raise ConfigError(f"wanda-power power must be > 0, got {power}")
            self.power = power

        def scores(self, W, stats):
            return W.abs() * stats.sq_norms.sqrt() ** self.power

    assert "wanda-power: exponent of the input norm" in build_parser()._subparsers._group_actions[0].choices[
        "prune"].format_help()
    assert PruneConfig.from_dict({"method": "wanda-power", "power": 2}).options == {"power": 2}
    with pytest.raises(ConfigError, match="wanda-power option power must be float, got str 'high'"):
        PruneConfig.from_dict({"method": "wanda-power", "power": "high"})
    with pytest.raises(ConfigError, match="wanda-power power must be > 0"):
        PruneConfig(method="wanda-power", options={"power": -1.0})
    report = tmp_path / "r.json"
    assert main(["prune", *cli_args(tiny_dir, "--method", "wanda-power", "--power", "2", "--no-eval"),
                 "--output", str(tmp_path / "out"), "--report", str(report)]) == 0
    r = json.loads(report.read_text())
    assert r["config"]["options"] == {"power": 2.0} and r["sparsity"] == pytest.approx(0.5)
    cells = api_module.compare_grid(["wanda", "wanda-power"], ["0.5"], {"power": 3.0})
    assert [c.options for _, _, c in cells] == [{}, {"power": 3.0}]


# --------------------------------------------------------------------------- joint pruning and quantization


def direct_obs_quant(W, H, mask, percdamp, quant):
    """Textbook OBS with quantization (the SparseGPT paper's joint mode, GPTQ's rounding): at column q a pruned
    weight goes to 0 and a kept one to its grid point, and either error updates the free columns as in
    :func:`direct_obs`; each group's scales are fixed at its first column from its current kept weights."""
    from secateurs.quant import codes_of

    W = W.clone()
    rows, n = W.shape
    H = H + percdamp * torch.diag(H).mean() * torch.eye(n, dtype=H.dtype)
    scales = torch.zeros(rows, n // quant.group_size)
    for q in range(n):
        g = q // quant.group_size
        if q % quant.group_size == 0:
            group = W[:, q:q + quant.group_size].masked_fill(mask[:, q:q + quant.group_size], 0)
            scales[:, g] = (group.abs().amax(1) / quant.qmax).float()
        Hinv = torch.linalg.inv(H[q:, q:])
        target = (codes_of(W[:, q], scales[:, g], quant).float() * scales[:, g]).double().masked_fill(mask[:, q], 0)
        W[:, q:] -= ((W[:, q] - target) / Hinv[0, 0]).unsqueeze(1) * Hinv[0, :].unsqueeze(0)
        W[:, q] = target
    return W, scales


@pytest.mark.parametrize("blocksize", [8, 16])
def test_joint_quantization_matches_direct_obs_with_rounding(blocksize):
    from secateurs.quant import Quant

    _, H = _hessian()
    g = torch.Generator().manual_seed(2)
    W = torch.randn(5, 16, generator=g, dtype=torch.float64)
    got = W.clone()
    quant = Quant(4, 8)
    mask, scales = sparsegpt_prune(got, H, UNSTRUCTURED, 0.5, blocksize=blocksize, percdamp=0.01, quant=quant)
    want, want_scales = direct_obs_quant(W, H, mask, 0.01, quant)
    assert torch.allclose(scales, want_scales, rtol=1e-6) and torch.allclose(got, want, atol=1e-6)
    assert (got[mask] == 0).all()
    codes = got / scales.repeat_interleave(8, dim=1)
    assert torch.allclose(codes, codes.round(), atol=1e-5) and codes.round().abs().max() <= 7  # the int4 grid


def test_joint_quantization_beats_rounding_to_nearest_on_the_layer_output():
    from secateurs.quant import Quant, round_to_nearest

    _, H = _hessian(n_in=32, tokens=512)
    g = torch.Generator().manual_seed(3)
    W = torch.randn(16, 32, generator=g, dtype=torch.float64)
    quant = Quant(4, 16)
    joint = W.clone()
    mask, _ = sparsegpt_prune(joint, H, UNSTRUCTURED, 0.5, blocksize=16, percdamp=0.01, quant=quant)
    pruned = W.clone()
    sparsegpt_prune(pruned, H, UNSTRUCTURED, 0.5, blocksize=16, percdamp=0.01)
    rtn, _ = round_to_nearest(pruned.float(), quant)

    def error(Wq):  # ||(W - Wq) X||^2 = tr((W - Wq) H (W - Wq)^T)
        D = W - Wq.double()
        return float(torch.trace(D @ H @ D.t()))

    assert error(joint) < error(rtn)
