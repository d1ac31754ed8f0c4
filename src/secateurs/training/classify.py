"""Fine-tuning an encoder for sequence classification, with its masks held.

:func:`classifier_for` gives the model to train: a sequence classifier with the training set's classes (a bare
encoder or a masked LM gets a new classification head on its own encoder weights; a classifier is kept as it
is, and refused if its classes are not the data's).  :class:`ClassifierLoss` is the loss of one micro-batch for
:func:`~.finetune.train`: the examples are shuffled once per epoch from ``(seed, epoch)``, so any step can be
re-run alone and a run is reproducible.
"""

from __future__ import annotations

import logging

import torch

from ..data.labelled import Examples, encode, label_ids, max_positions, pad
from ..errors import ArchitectureError, ConfigError

log = logging.getLogger(__name__)


def classifier_for(model, classes: list):
    """A sequence classifier over ``classes`` (the training set's, sorted) built from ``model``: the model
    itself when it is one with those classes, else its encoder weights under a new head."""
    import transformers

    from ..models.arch import ENCODERS, head_of
    from ..structured.surgery import STRUCTURE_KEY, apply_structure, built_config

    config = model.config
    if getattr(config, "model_type", None) not in ENCODERS:
        raise ConfigError(f"{type(model).__name__} is not an encoder ({', '.join(ENCODERS)}): classification "
                          "fine-tunes an encoder")
    names = [str(c) for c in classes]
    if head_of(model) == "classifier":
        own = [config.id2label[i] for i in range(config.num_labels)]
        if isinstance(classes[0], int):
            if max(classes) >= config.num_labels:
                raise ConfigError(f"the training labels go up to {max(classes)}, but the model has "
                                  f"{config.num_labels} classes")
        elif sorted(own) != sorted(names):
            raise ConfigError(f"the training classes ({', '.join(names)}) differ from the model's "
                              f"({', '.join(own)})")
        return model
    kind = type(model).__name__.removesuffix("ForMaskedLM").removesuffix("Model")
    cls = getattr(transformers, f"{kind}ForSequenceClassification")
    ids = range(len(classes)) if isinstance(classes[0], str) else classes
    label2id = {n: i for n, i in zip(names, ids)} if isinstance(classes[0], str) else None
    new_config = type(config).from_dict({**config.to_dict(), "num_labels": max(ids) + 1,
                                         "architectures": [cls.__name__],
                                         **({"label2id": label2id, "id2label": {i: n for n, i in label2id.items()}}
                                            if label2id else {})})
    torch.manual_seed(0)  # the new head's initial weights, reproducibly
    structure = getattr(config, STRUCTURE_KEY, None)  # a structured cut: fewer heads, per-layer widths
    head = cls(built_config(new_config, structure)).to(next(model.parameters()).dtype)
    if structure:
        apply_structure(head, structure)
        setattr(head.config, STRUCTURE_KEY, structure)
    encoder = getattr(head, head.base_model_prefix)
    source = getattr(model, model.base_model_prefix, model)
    found = encoder.load_state_dict(source.state_dict(), strict=False)  # a model saved without a pooler has none
    missing = [k for k in found.missing_keys if not k.startswith("pooler.")]
    if missing or found.unexpected_keys:
        raise ArchitectureError(f"{type(model).__name__}'s encoder does not fit {cls.__name__}'s (missing "
                                f"{missing[:2]}, unexpected {found.unexpected_keys[:2]})")
    log.info("%s: a new classification head over %d classes on %s's encoder%s", cls.__name__, len(classes),
             type(model).__name__, f" ({', '.join(found.missing_keys)} new)" if found.missing_keys else "")
    return head.eval()


class ClassifierLoss:
    """Cross-entropy of one micro-batch of ``examples`` for :func:`~.finetune.train` (``loss_of``)."""

    def __init__(self, model, tokenizer, examples: Examples, batch_size: int, seed: int, grad_accum: int = 1):
        self.labels = label_ids(examples, dict(model.config.label2id or {}), model.config.num_labels,
                                type(model).__name__)
        self.ids = encode(tokenizer, examples.texts, max_positions(model, tokenizer))
        self.tokenizer, self.batch_size, self.seed, self.grad_accum = tokenizer, batch_size, seed, grad_accum
        self._orders: dict = {}

    def indices(self, step: int, micro: int) -> list:
        n, b = len(self.ids), self.batch_size
        first = (step * self.grad_accum + micro) * b
        out = []
        for k in range(first, first + b):
            epoch = k // n
            if epoch not in self._orders:
                self._orders[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(
                    self.seed * 1_000_003 + epoch)).tolist()
            out.append(self._orders[epoch][k % n])
        return out

    def __call__(self, model, step: int, micro: int) -> torch.Tensor:
        chosen = self.indices(step, micro)
        input_ids, mask = pad(self.tokenizer, [self.ids[i] for i in chosen])
        device = next(model.parameters()).device
        out = model(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                    labels=self.labels[chosen].to(device))
        return out.loss

