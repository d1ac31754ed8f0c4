"""Causal-LM training of a (pruned) model with its masks held: recovery fine-tuning and gradual pruning.

One loop serves both.  Without a schedule the zeros the model has at the start are frozen (recovery after
one-shot pruning); with one, a :class:`~.masks.GradualPruner` grows the masks on the schedule while training
(gradual magnitude pruning).  Either way the masks are re-applied after every optimizer step.  Batches are
random windows of the train text drawn from a generator seeded by ``(seed, step)``, so a run is reproducible
and any stretch of it can be re-run alone.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import asdict, dataclass, field

import torch

from ..errors import ConfigError, DataError
from ..progress import Stage, Tracker
from .lora import add_lora, merge_lora
from .masks import GradualPruner, Masks, measured_sparsity, prunable_linears
from .schedules import Schedule, schedule_reads

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """One training run. ``lora_rank = 0`` trains every parameter; ``> 0`` trains masked LoRA adapters only."""

    steps: int = 100
    batch_size: int = 4  # windows per micro-batch
    seqlen: int = 256
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 2e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0  # linear warm-up, then constant
    max_grad_norm: "float | None" = 1.0
    precision: str = "fp32"  # fp32 | bf16 (autocast; the weights and optimizer stay fp32)
    lora_rank: int = 0
    lora_alpha: "float | None" = None  # LoRA scale numerator; None = 16 (read only with lora_rank > 0)
    eval_every: int = 0  # 0 = evaluate only before and after
    seed: int = 0
    schedule: "dict | None" = None  # Schedule fields: gradual pruning while training (None = frozen mask)
    pattern: "str | None" = None  # gradual pruning: unstructured (None) | block:B
    group: "str | None" = None  # gradual pruning: compare |w| per layer (None) or per row

    def __post_init__(self):
        from ..errors import ConfigError

        def check(cond, msg):
            if not cond:
                raise ConfigError(msg)

        check(self.steps >= 1 and self.batch_size >= 1 and self.seqlen >= 2 and self.grad_accum >= 1,
              "steps, batch_size, grad_accum must be >= 1 and seqlen >= 2")
        check(self.lr > 0 and self.weight_decay >= 0, "lr must be > 0 and weight_decay >= 0")
        check(self.warmup_steps >= 0 and self.eval_every >= 0 and self.lora_rank >= 0,
              f"warmup_steps, eval_every and lora_rank must be >= 0, got {self.warmup_steps}, {self.eval_every}, "
              f"{self.lora_rank}")
        check(self.max_grad_norm is None or self.max_grad_norm > 0, "max_grad_norm must be > 0")
        check(self.precision in ("fp32", "bf16"), f"precision must be fp32 or bf16, got {self.precision!r}")
        check(self.group in (None, "layer", "row"), f"group must be layer or row, got {self.group!r}")
        check(not (self.schedule is not None and self.lora_rank), "gradual pruning trains the weights: no LoRA")
        check(self.schedule is not None or (self.pattern is None and self.group is None),
              "pattern and group shape gradual pruning: they need a schedule (without one the mask stays frozen)")
        check(self.lora_alpha is None or self.lora_rank > 0,
              "lora_alpha needs lora_rank R (without one every weight trains, no adapters)")
        if self.schedule is not None:
            self.schedule_value  # validates

    @property
    def schedule_value(self) -> "Schedule | None":
        """The gradual-pruning schedule; its ``end_step``, where it reads one and none is given, is 3/4 of the steps."""
        if self.schedule is None:
            return None
        name = self.schedule.get("name", "cubic")
        default = {"end_step": (3 * self.steps) // 4} if self.schedule.get("end_step") is None and \
            "end_step" in schedule_reads(name) else {}
        return Schedule(**{**self.schedule, **default})

    def to_dict(self) -> dict:
        return asdict(self)


def training_batch(ids: torch.Tensor, batch: int, seqlen: int, seed: int, step: int, micro: int = 0) -> torch.Tensor:
    """``(batch, seqlen)`` random windows of the token stream ``ids``, reproducible from (seed, step, micro)."""
    if len(ids) <= seqlen:
        raise DataError(f"training text has {len(ids)} tokens, fewer than one window of {seqlen}")
    g = torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_009 + micro)
    starts = torch.randint(0, len(ids) - seqlen, (batch,), generator=g)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


@dataclass
class TrainHistory:
    steps: list = field(default_factory=list)  # optimizer steps done
    loss: list = field(default_factory=list)  # mean training loss of each step
    evals: list = field(default_factory=list)  # {"step", "perplexity", "sparsity"}
    sparsity_updates: list = field(default_factory=list)  # {"step", "target", "measured"}
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def training_state_bytes(model, config: TrainConfig) -> int:
    """About the size of one training state that :func:`train` hands to ``save_state``, known before training:
    the weights (each shared tensor once; with LoRA also the adapters), AdamW's two moments of every trained
    parameter, and one byte per masked weight.  Small tensors (RNG, schedule, step counts) are left out."""
    from ..models.arch import weight_of
    from ..models.snapshot import weight_bytes

    linears = [weight_of(m) for m in prunable_linears(model).values()]
    weights = weight_bytes(model)
    if config.lora_rank:  # A (rank, in) and B (out, rank) per linear, in the weight's dtype
        trained = sum(config.lora_rank * sum(W.shape) * W.element_size() for W in linears)
        weights += trained
    else:
        trained = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return weights + 2 * trained + sum(W.numel() for W in linears)


def train(model, train_ids: "torch.Tensor | None", config: TrainConfig, evaluate=None, tracker: "Tracker | None" = None,
          progress: bool = True, *, save_every: int = 0, save_state=None, resume: "dict | None" = None,
          loss_of=None, metric: str = "perplexity") -> TrainHistory:
    """Train ``model`` in place on windows of ``train_ids``; masks held (or grown) throughout.

    ``loss_of(model, step, micro)``, if given, is the loss of each micro-batch instead of the causal-LM loss on
    windows of ``train_ids`` (a classifier's cross-entropy: :class:`~.classify.ClassifierLoss`).
    ``evaluate(model) -> value`` (perplexity, or the ``metric`` it measures) is called before training, every
    ``eval_every`` steps and at the end; the history records it under ``metric``.
    With LoRA the adapters are merged back at the end (zeros untouched) and the model is plain again.

    Checkpoints: ``save_state(state)`` is called every ``save_every`` optimizer steps with a dict holding all
    that training needs to go on (weights and adapters, optimizer and learning-rate schedule, masks, the
    gradual pruner's sparsity, history, the RNG); its tensors are the live ones, so write it out at once
    (``torch.save``).  ``resume`` is such a state, to be given with the model as it
    was when that run started: training continues after the state's step and ends with exactly the weights an
    uninterrupted run would have, since every batch is drawn from ``(seed, step)``.
    """
    from ..config import check_seqlen

    if loss_of is None:
        check_seqlen(model, config.seqlen, "training seqlen")
    tracker = tracker or Tracker(show=progress)
    tracker.enter(Stage.FINE_TUNING)
    names = list(prunable_linears(model))
    schedule = config.schedule_value
    pruner = GradualPruner(model, schedule, config.pattern or "unstructured", config.group or "layer") if schedule else None
    masks = pruner.masks if pruner else Masks.from_zeros(model)
    history = TrainHistory()
    device = next(model.parameters()).device
    if resume is not None:
        if resume["train"] != config.to_dict():
            raise ConfigError("the training state to resume was saved under another training config")
        # the state was saved (and is loaded) on the CPU
        masks.masks = {name: mask.to(device) for name, mask in resume["masks"].items()}
        if pruner:
            pruner.current = resume["pruner_sparsity"]
        history = TrainHistory(**resume["history"])

    def record_eval(step):
        if evaluate is None:
            return
        was_training = model.training
        model.eval()
        value = evaluate(model)
        model.train(was_training)
        history.evals.append({"step": step, metric: value, "sparsity": measured_sparsity(model, names)})
        log.info("step %d: %s %.4f, sparsity %.4f", step, metric, value, history.evals[-1]["sparsity"])

    if config.lora_rank:
        add_lora(model, config.lora_rank, 16.0 if config.lora_alpha is None else config.lora_alpha, seed=config.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    warm = config.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if config.precision == "bf16"
                else contextlib.nullcontext())
    first = 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        torch.set_rng_state(resume["rng"])
        first = resume["step"]
    start = time.perf_counter() - history.seconds
    if resume is None:
        record_eval(0)
    model.train()
    bar = tracker.bar(total=config.steps, initial=first, unit="step")
    with masks.attached(optimizer, model) if not config.lora_rank else contextlib.nullcontext():
        for step in range(first, config.steps):
            if pruner and (target := pruner.step(step)) is not None:
                history.sparsity_updates.append({"step": step, "target": target,
                                                 "measured": measured_sparsity(model, names)})
            total = 0.0
            for micro in range(config.grad_accum):
                with autocast:
                    if loss_of is not None:
                        loss = loss_of(model, step, micro) / config.grad_accum
                    else:
                        batch = training_batch(train_ids, config.batch_size, config.seqlen, config.seed, step,
                                               micro).to(device)
                        loss = model(input_ids=batch, labels=batch, use_cache=False).loss / config.grad_accum
                loss.backward()
                total += loss.detach().item()
            if not math.isfinite(total):
                raise FloatingPointError(f"training loss is {total} at step {step}; lower the learning rate")
            if config.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()  # the masks' post-step hook re-zeroes the pruned weights here
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            history.steps.append(step + 1)
            history.loss.append(total)
            bar.set_postfix_str(f"loss {total:.3f}")
            bar.update(1)
            if config.eval_every and (step + 1) % config.eval_every == 0 and step + 1 < config.steps:
                record_eval(step + 1)
            if save_state and save_every and (step + 1) % save_every == 0 and step + 1 < config.steps:
                history.seconds = time.perf_counter() - start
                save_state({"step": step + 1, "train": config.to_dict(), "model": model.state_dict(),
                            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                            "masks": masks.state_dict(), "pruner_sparsity": pruner.current if pruner else None,
                            "history": history.to_dict(), "rng": torch.get_rng_state()})
    bar.close()
    model.eval()
    if config.lora_rank:
        merge_lora(model)
    history.seconds = time.perf_counter() - start
    record_eval(config.steps)
    return history
