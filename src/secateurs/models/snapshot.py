"""A model's weights kept on disk instead of in memory, to put them back later (compare's dense start).

``compare`` prunes the same model once per cell and must start every cell from the dense weights.  A copy of
the ``state_dict`` in memory doubles the model's footprint (a 7B model in bfloat16 is 13.5 GB); this keeps
the copy in a temporary file and reads it back into the model's own tensors, in place, one tensor at a time.
"""

from __future__ import annotations

import tempfile

import torch
from torch import nn

from ..errors import SnapshotError


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """``t``'s contents as a flat uint8 CPU tensor (a view when ``t`` is a contiguous CPU tensor)."""
    return t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)


def distinct_tensors(model: nn.Module):
    """``(name, tensor)`` for every tensor of ``model.state_dict()``, those that share memory (tied embeddings)
    only once: what ``save_pretrained`` writes, and what a snapshot keeps."""
    seen = set()
    for name, t in model.state_dict().items():
        key = (t.device, t.data_ptr(), t.shape, t.stride()) if t.device.type != "meta" else name
        if key not in seen:
            seen.add(key)
            yield name, t


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the tensors :func:`distinct_tensors` yields: what the saved weights take on disk."""
    return sum(t.numel() * t.element_size() for _, t in distinct_tensors(model))


class WeightSnapshot:
    """Every tensor of ``model.state_dict()`` written once to a temporary file; :meth:`restore` reads them back.

    The file is unlinked as soon as it is made (:func:`tempfile.TemporaryFile`), so nothing is left on disk
    whatever ends the process.  Tensors that share memory (tied embeddings) are written once.  Use as a
    context manager, or call :meth:`close`.

    >>> with WeightSnapshot(model) as dense:      # doctest: +SKIP
    ...     prune(model, cfg, calib)
    ...     dense.restore(model)                  # the weights are the dense ones again
    """

    def __init__(self, model: nn.Module, directory: "str | None" = None):
        self.entries: list[tuple[str, torch.Size, torch.dtype]] = []
        self._file = tempfile.TemporaryFile(dir=directory)
        try:
            for name, t in distinct_tensors(model):
                self.entries.append((name, t.shape, t.dtype))
                self._file.write(_bytes(t).numpy())
            self._file.flush()
        except OSError as e:
            self._file.close()
            raise SnapshotError(f"cannot keep the model's weights in a temporary file ({e}); point TMPDIR at a "
                                "folder with room for the whole model") from e
        except BaseException:
            self._file.close()
            raise

    @torch.no_grad()
    def restore(self, model: nn.Module) -> None:
        """Write the saved tensors back into ``model``'s own tensors (same names, shapes and dtypes)."""
        tensors = model.state_dict()
        self._file.seek(0)
        for name, shape, dtype in self.entries:
            t = tensors.get(name)
            if t is None or t.shape != shape or t.dtype != dtype:
                raise SnapshotError(f"cannot restore {name}: the model no longer has a {dtype} tensor of shape "
                                 f"{tuple(shape)} there")
            direct = t.device.type == "cpu" and t.is_contiguous()
            buf = t if direct else torch.empty(shape, dtype=dtype)
            view = memoryview(_bytes(buf).numpy())
            done = 0
            while done < len(view):  # a single read may return less than asked for
                got = self._file.readinto(view[done:])
                if not got:
                    raise SnapshotError(f"cannot restore {name}: the snapshot file ended early")
                done += got
            if not direct:
                t.copy_(buf)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "WeightSnapshot":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
