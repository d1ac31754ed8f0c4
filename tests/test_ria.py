"""RIA: relative importance times tempered activations, against its formula computed by hand."""

import pytest
import torch

from conftest import FAMILIES, tiny_model
from secateurs import ConfigError, PruneConfig, prune
from secateurs.methods import InputStats, LayerTarget, get_method
from secateurs.patterns import Pattern


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
