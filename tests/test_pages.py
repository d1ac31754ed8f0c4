"""Overwriting weights by handing their old pages back first (secateurs.models.pages)."""

import sys

import pytest
import torch
import transformers as tf

from conftest import tiny_model
from secateurs.models import find_blocks, find_linears, set_weight_of, weight_of
from secateurs.models import pages
from secateurs.models.pages import byte_range, discard_pages, overwrite_, whole_pages

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise is used on Linux only")
PAGE = pages.mmap.PAGESIZE
FLOATS_PER_PAGE = PAGE // 4


def test_whole_pages_lie_inside_the_range():
    assert whole_pages(100, 9000, page=4096) == (4096, 8192)
    assert whole_pages(0, 8192, page=4096) == (0, 8192)
    assert whole_pages(4096, 12287, page=4096) == (4096, 8192)
    assert whole_pages(1, 8191, page=4096) is None  # crosses a page boundary without holding a whole page


def test_byte_range_only_for_tensors_that_fill_it():
    x = torch.zeros(8, 16)
    start = x.data_ptr()
    assert byte_range(x) == (start, start + 8 * 16 * 4)
    assert byte_range(x.t()) == (start, start + 8 * 16 * 4)  # GPT-2's Conv1D weight seen as (out, in)
    assert byte_range(x[:, ::2]) is None  # every other column: gaps
    assert byte_range(x[:, :1].expand(8, 5)) is None  # repeats
    assert byte_range(torch.zeros(0)) is None


@linux_only
def test_discarded_pages_read_zero_and_partial_pages_are_kept():
    buf = torch.ones(8 * FLOATS_PER_PAGE)
    offset = (-(-buf.data_ptr() // PAGE) * PAGE - buf.data_ptr()) // 4  # floats up to the first page boundary
    start = offset + FLOATS_PER_PAGE + 7  # the slice starts mid-page, ...
    end = start + 3 * FLOATS_PER_PAGE  # ... and ends mid-page: it holds two whole pages
    assert discard_pages(buf[start:end])
    zero = (buf == 0).nonzero().squeeze(1)
    first = offset + 2 * FLOATS_PER_PAGE
    assert zero.tolist() == list(range(first, first + 2 * FLOATS_PER_PAGE))


def test_overwrite_leaves_neighbours_alone():
    buf = torch.ones(16 * FLOATS_PER_PAGE)
    target = buf[1001 : 1001 + 9 * FLOATS_PER_PAGE].view(9, FLOATS_PER_PAGE)
    source = torch.randn(9, FLOATS_PER_PAGE)
    overwrite_(target, source)
    assert torch.equal(target, source)
    assert torch.equal(buf[:1001], torch.ones(1001))
    assert torch.equal(buf[1001 + 9 * FLOATS_PER_PAGE :], torch.ones(16 * FLOATS_PER_PAGE - 1001 - 9 * FLOATS_PER_PAGE))


@pytest.mark.parametrize("case", ["source overlaps target", "shapes differ"])
def test_a_copy_that_fails_loses_nothing(case):
    """Pages are handed back only when the copy is sure to refill them."""
    buf = torch.arange(20 * FLOATS_PER_PAGE, dtype=torch.float32)
    target = buf[: 16 * FLOATS_PER_PAGE]
    before = target.clone()
    source = buf[4 * FLOATS_PER_PAGE :] if case == "source overlaps target" else torch.zeros(2, 8 * FLOATS_PER_PAGE)
    with pytest.raises(RuntimeError):
        overwrite_(target, source)
    assert torch.equal(target, before)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_set_weight_of_on_a_memory_mapped_model(family, tmp_path, monkeypatch):
    """The way pruned weights go back into a model loaded from safetensors: every linear gets exactly the new
    values, and nothing else in the file's memory changes (a page handed back too many would revert an
    already written neighbour to the file's bytes)."""
    tiny_model(family).save_pretrained(tmp_path)
    model = tf.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model(torch.randint(0, 100, (1, 8)))  # read every weight, as the dense evaluation does
    discarded = []
    real = pages._discard_span
    monkeypatch.setattr(pages, "_discard_span", lambda span: discarded.append(real(span)) or discarded[-1])

    name, blocks = find_blocks(model)
    written = {}
    torch.manual_seed(1)
    for i, block in enumerate(blocks):
        for n, module in find_linears(block, f"{name}.{i}.").items():
            written[n] = torch.randn_like(weight_of(module))
            set_weight_of(module, written[n])
    for n, module in dict(model.named_modules()).items():
        if n in written:
            assert torch.equal(weight_of(module), written[n]), n
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, original[k])}
    assert changed == {f"{n}.weight" for n in written}
    if sys.platform.startswith("linux"):
        assert any(discarded)  # the pages were really handed back, not just copied over
