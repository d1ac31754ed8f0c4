"""Save a walk's progress after finished blocks, so that a prune stopped part-way resumes where it was.

After block ``i`` a walk is three things: the weights of blocks ``0..i`` as pruned, the outputs of block ``i``
for every calibration batch (the next block's inputs), and the records of the layers pruned so far.  All else
is recomputed on resuming: the blocks' call arguments are captured again (the embeddings only: cheap) and the
blocks after ``i`` are still dense in a freshly loaded model.  The walk is deterministic, so a resumed walk
ends with exactly the weights of an uninterrupted one.

The folder holds::

    walk.json               the next block, the records so far, the seconds spent, and which run this is
    block-NNN.safetensors   block NNN's weights after pruning (written once)
    hidden-NNN.safetensors  block NNN's outputs, one tensor per calibration batch (only the newest is kept)

A streamed walk (``shards=True``) writes no ``block-NNN`` files: its finished blocks are written, once, as the
output's own shards (``model-0000N-of-...``) into this folder, and moved into the output when the walk ends.

Every file is written atomically and ``walk.json`` last, so a kill at any moment leaves the previous state
whole.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .. import atomic
from ..errors import ConfigError
from .sequential import LayerRecord


@dataclass
class WalkState:
    """A walk after its block ``next_block - 1``."""

    next_block: int
    records: list  # LayerRecord of every layer pruned so far
    hidden: list  # the next block's inputs, one (B, L, H) tensor per calibration batch
    seconds: float  # walk time spent before this process


def walk_identity(run: dict, config, input_ids: torch.Tensor, dtype: torch.dtype) -> dict:
    """What must be equal for a saved walk to be resumed: ``run`` (the caller's: model name...), the config, the
    calibration tokens (by digest) and the blocks' dtype, as JSON would give them back."""
    ids = input_ids.detach().cpu().contiguous()
    digest = hashlib.sha256(ids.numpy().tobytes()).hexdigest()
    identity = {**run, "config": config.to_dict(), "calibration": {"shape": list(ids.shape), "sha256": digest},
                "dtype": str(dtype)}
    return json.loads(json.dumps(identity))


class WalkCheckpoint:
    """A folder for one walk's state.  ``every``: save after every that many finished blocks (None: never
    save, only resume from a state already there)."""

    def __init__(self, folder, run: "dict | None" = None, every: "int | None" = 1, shards: bool = False):
        if every is not None and every < 1:
            raise ConfigError(f"save every {every} blocks: must be >= 1")
        self.folder = Path(folder)
        self.shards = shards  # a streamed walk: the finished blocks are in the output's shards, here
        self.run = {**(run or {}), **({"streamed": True} if shards else {})}
        self.every = every
        self.identity: "dict | None" = None
        self.resumed_at: "int | None" = None  # the block a resumed walk started at
        self._saved = 0  # blocks whose weights are in the folder: 0 .. _saved - 1

    def _read(self) -> "dict | None":
        from ..errors import ConfigError

        path = self.folder / "walk.json"
        if not path.exists():
            return None
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
            if not (isinstance(state, dict) and _KEYS <= state.keys()):
                raise ValueError(f"it lacks {', '.join(sorted(_KEYS - set(state)))}" if isinstance(state, dict)
                                 else "not a mapping")
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError included
            raise ConfigError(f"{path} is not a walk state ({exc}); remove {self.folder} (with the CLI: "
                              "--no-resume) to start over") from None
        return state

    @property
    def saved_block(self) -> "int | None":
        """The last block whose state is saved, or None (also when what is there cannot be read)."""
        try:
            state = self._read()
        except ValueError:
            return None
        return state["next_block"] - 1 if state else None

    def start(self, config, input_ids: torch.Tensor, dtype: torch.dtype) -> "WalkState | None":
        """Bind this checkpoint to a walk; return its saved state, or None when there is none yet.  A state
        saved by another run (another config, calibration, model or dtype) is refused, naming what differs."""
        from ..errors import ConfigError

        self.identity = walk_identity(self.run, config, input_ids, dtype)
        state = self._read()
        if state is None:
            return None
        if state["identity"] != self.identity:
            differ = sorted(k for k in {*state["identity"], *self.identity}
                            if state["identity"].get(k) != self.identity.get(k))
            raise ConfigError(f"{self.folder} holds the walk of another run ({', '.join(differ)} differ); remove it "
                              "(with the CLI: --no-resume) to start over")
        hidden = load_file(self.folder / state["hidden"])
        self.resumed_at = self._saved = state["next_block"]
        return WalkState(state["next_block"], [_record(r) for r in state["records"]],
                         [hidden[str(b)] for b in range(len(hidden))], state["seconds"])

    def restore(self, blocks, state: WalkState) -> None:
        """Put the saved weights of the finished blocks into ``blocks`` (a streamed walk needs them no more:
        they are written)."""
        if self.shards:
            return
        for j in range(state.next_block):
            blocks[j].load_state_dict(load_file(self.folder / f"block-{j:03d}.safetensors"))

    def due(self, block: int, last: int) -> bool:
        """Save after ``block``?  Never after the last one: nothing would be left to resume."""
        return self.every is not None and block < last and (block + 1) % self.every == 0

    def save(self, block: int, blocks, records: list, hidden: list, seconds: float) -> None:
        """Save the walk after ``block``: the weights of the blocks finished since the last save, ``hidden``
        (that block's outputs), the ``records`` so far and the walk ``seconds`` spent in all."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for j in range(self._saved, block + 1) if not self.shards else ():
            tensors = {k: v.detach().cpu().contiguous() for k, v in blocks[j].state_dict().items()}
            atomic.replace_file(self.folder / f"block-{j:03d}.safetensors", lambda tmp: save_file(tensors, tmp))
        name = f"hidden-{block:03d}.safetensors"
        outputs = {str(b): h.contiguous() for b, h in enumerate(hidden)}
        atomic.replace_file(self.folder / name, lambda tmp: save_file(outputs, tmp))
        atomic.write_text(self.folder / "walk.json", json.dumps(
            {"identity": self.identity, "next_block": block + 1, "hidden": name,
             "records": [asdict(r) for r in records], "seconds": seconds}, indent=1) + "\n")
        self._saved = block + 1
        for old in self.folder.glob("hidden-*.safetensors"):
            if old.name != name:
                old.unlink()


_KEYS = {"identity", "next_block", "hidden", "records", "seconds"}


def _record(fields: dict) -> LayerRecord:
    return LayerRecord(**{**fields, "shape": tuple(fields["shape"])})
