"""What an encoder is measured by: a classifier's accuracy on labelled text, a masked LM's pseudo-perplexity.

Perplexity reads a causal LM's next-token predictions, which an encoder does not make.  A sequence classifier
is measured by the share of examples whose highest-scoring class is their label (with its standard error); a
masked LM by its pseudo-perplexity (Salazar et al. 2020): every token of a window masked in turn and scored
from the rest, ``exp`` of the mean negative log-likelihood.
"""

from __future__ import annotations

import math

import torch

from ..data.labelled import Examples, batches, label_ids, max_positions
from ..errors import ConfigError
from ..models.arch import head_of


METRICS = {"causal": "perplexity", "classifier": "accuracy", "masked-lm": "pseudo-perplexity", "bare": None}


def metric_of(model, metric: "str | None") -> str:
    """The measure of ``model``: ``metric`` if given and it applies, else the model's own (:data:`METRICS`)."""
    head = head_of(model)
    own = METRICS[head]
    if own is None:
        raise ConfigError(f"{type(model).__name__} is an encoder without a head, with nothing to measure: --no-eval, "
                          "or fine-tune a classifier (secateurs finetune --task classification)")
    if metric is not None and metric != own:
        raise ConfigError(f"{metric} does not apply to {type(model).__name__}, which is measured by {own}")
    return own


@torch.no_grad()
def accuracy(model, tokenizer, examples: Examples, batch_size: int = 16) -> dict:
    """``{"accuracy", "accuracy_stderr", "examples"}`` of a sequence classifier on ``examples``."""
    if head_of(model) != "classifier":
        raise ConfigError(f"{type(model).__name__} has no classification head: accuracy needs a model saved as "
                          "...ForSequenceClassification (or fine-tune one: secateurs finetune --task classification)")
    labels = label_ids(examples, dict(model.config.label2id or {}), model.config.num_labels, type(model).__name__)
    device = next(model.parameters()).device
    limit = max_positions(model, tokenizer)
    predicted = []
    for input_ids, mask in batches(tokenizer, examples.texts, batch_size, limit):
        logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
        predicted.append(logits.argmax(-1).cpu())
    hits = (torch.cat(predicted) == labels).double()
    n, p = len(hits), float(hits.mean())
    return {"accuracy": p, "accuracy_stderr": math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else None, "examples": n}


@torch.no_grad()
def pseudo_perplexity(model, tokenizer, windows: torch.Tensor, batch_size: int = 32) -> float:
    """Pseudo-perplexity of a masked LM over token windows ``(W, L)`` (each wrapped in the tokenizer's
    start and end tokens): every position masked in turn, ``exp`` of the mean negative log-likelihood."""
    if head_of(model) != "masked-lm":
        raise ConfigError(f"{type(model).__name__} has no masked-LM head: pseudo-perplexity needs a ...ForMaskedLM "
                          "model")
    if tokenizer.mask_token_id is None:
        raise ConfigError("the tokenizer has no mask token: pseudo-perplexity masks each token in turn")
    start = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    end = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for window in windows:
        ids = torch.cat([torch.tensor([start]), window, torch.tensor([end])]) if None not in (start, end) else window
        inner = torch.arange(1, len(ids) - 1) if None not in (start, end) else torch.arange(len(ids))
        for chunk in inner.split(batch_size):
            masked = ids.repeat(len(chunk), 1)
            masked[torch.arange(len(chunk)), chunk] = tokenizer.mask_token_id
            logits = model(input_ids=masked.to(device)).logits.float()
            logp = torch.log_softmax(logits[torch.arange(len(chunk)), chunk.to(device)], -1)
            total -= float(logp.gather(1, ids[chunk].to(device)[:, None]).sum())
            count += len(chunk)
    return math.exp(total / count)
