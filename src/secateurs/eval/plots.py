"""The figures of a sweep's report, drawn with matplotlib (Agg, no display) from its ``results.json``.

Each function takes the results and returns a figure, or None when the sweep holds nothing it could draw
(no sparsity axis, no fine-tuned cell, ...).  :func:`png` turns a figure into PNG bytes.
"""

from __future__ import annotations

import io
import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def _weight_cells(results: dict) -> list:
    """Cells that pruned weights of the whole model once, unstructured, without fine-tuning: the cells of a
    perplexity-against-sparsity curve."""
    return [c for c in results["cells"] if c["config"].get("pattern") == "unstructured"
            and c["config"].get("include") == ["all"] and "block" not in c["fields"] and "recovery" not in c]


def _series(config: dict) -> str:
    name = config["method"] + (f"+{config['refine']}" if config.get("refine", "none") != "none" else "")
    return name + (f" ({config['allocation']})" if config.get("allocation", "uniform") != "uniform" else "")


def perplexity_vs_sparsity(results: dict):
    """Perplexity (log scale) against measured sparsity, one line per method; dense as a dashed line."""
    series: dict[str, list] = {}
    for cell in _weight_cells(results):
        series.setdefault(_series(cell["config"]), []).append((cell["sparsity"], cell["perplexity"]))
    series = {k: sorted(v) for k, v in series.items() if len({round(s, 3) for s, _ in v}) >= 2}
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, points in series.items():
        ax.plot(*zip(*points), marker="o", label=name)
    ax.axhline(results["dense"]["perplexity"], color="grey", linestyle="--", label="dense")
    ax.set(xlabel="measured sparsity", ylabel="perplexity (log scale)", yscale="log",
           title="Perplexity against sparsity")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return fig


def _layer_grid(per_layer: dict, names):
    """``(matrix blocks x roles, role names)`` of per-layer sparsities over the layers ``names``; a layer the
    cell did not prune counts 0."""
    where = {}
    for name in names:
        m = re.search(r"\.(\d+)\.(.+)$", name)
        if m:
            where[int(m.group(1)), m.group(2).split(".")[-1]] = per_layer.get(name, 0.0)
    roles = list(dict.fromkeys(r for _, r in where))
    grid = np.zeros((max(b for b, _ in where) + 1, len(roles)))
    for (b, r), value in where.items():
        grid[b, roles.index(r)] = value
    return grid, roles


def layer_sparsity(results: dict, most: int = 4):
    """Heat maps block x layer role of the measured sparsity, for the cells (at most ``most``) whose layers
    differ: scopes, allocations, per-layer rules."""
    cells = [c for c in results["cells"] if "block" not in c["fields"] and c.get("per_layer")]
    names = list(dict.fromkeys(n for c in cells for n in c["per_layer"]))
    cells = [c for c in cells if len(c["per_layer"]) < len(names)
             or max(c["per_layer"].values()) - min(c["per_layer"].values()) > 0.01][:most]
    if not cells:
        return None
    fig, axes = plt.subplots(1, len(cells), figsize=(3.4 * len(cells) + 1, 5), squeeze=False)
    for ax, cell in zip(axes[0], cells):
        grid, roles = _layer_grid(cell["per_layer"], names)
        image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
        ax.set_xticks(range(len(roles)), roles, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(len(grid)))
        ax.tick_params(axis="y", labelsize=7)
        ax.set_ylabel("block")
        ax.set_title(_label(cell), fontsize=8)
    fig.colorbar(image, ax=axes[0].tolist(), label="sparsity", shrink=0.8)
    fig.suptitle("Per-layer sparsity")
    return fig


def _label(cell: dict) -> str:
    """A cell's own settings; a sensitivity cell's scope is its block (and role), not its long regex."""
    hide = ("include",) if "block" in cell["fields"] else ()
    return " ".join(f"{k}={'/'.join(map(str, v)) if isinstance(v, list) else v}" for k, v in cell["fields"].items()
                    if k not in hide)


def sensitivity(results: dict):
    """Perplexity change when one block (or one block's attention or MLP) alone is pruned."""
    cells = [c for c in results["cells"] if "block" in c["fields"]]
    if not cells:
        return None
    dense = results["dense"]["perplexity"]
    groups: dict[tuple, dict] = {}
    for c in cells:
        base = tuple((k, str(v)) for k, v in c["fields"].items() if k not in ("block", "role", "include"))
        groups.setdefault(base + (("role", c["fields"].get("role", "block")),), {})[c["fields"]["block"]] = \
            c["perplexity"] - dense
    fig, ax = plt.subplots(figsize=(7.5, 4))
    width = 0.8 / len(groups)
    for k, (key, deltas) in enumerate(groups.items()):
        blocks = sorted(deltas)
        ax.bar(np.array(blocks) + (k - (len(groups) - 1) / 2) * width, [deltas[b] for b in blocks], width,
               label=" ".join(f"{a}={b}" for a, b in key if a not in ("sensitivity",)))
    ax.set(xlabel="block pruned alone", ylabel="perplexity change", title="Layer sensitivity")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def recovery(results: dict):
    """Perplexity during recovery fine-tuning, one line per fine-tuned cell."""
    cells = [c for c in results["cells"] if c.get("recovery")]
    if not cells:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for cell in sorted(cells, key=lambda c: -c["fields"]["finetune_steps"]):
        steps = [e["step"] for e in cell["recovery"]]
        ax.plot(steps, [e["perplexity"] for e in cell["recovery"]], marker="o", label=_label(cell))
    ax.axhline(results["dense"]["perplexity"], color="grey", linestyle="--", label="dense")
    ax.set(xlabel="fine-tuning step", ylabel="perplexity (log scale)", yscale="log",
           title="Recovery fine-tuning (mask held)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def pareto(results: dict):
    """Perplexity against measured prefill speed-up over dense, with the cells no other cell beats on both."""
    from .speed import speed_ratios

    dense = results["dense"]
    cells = [c for c in results["cells"] if "speed" in c]
    if not cells or "speed" not in dense:
        return None
    points = [(speed_ratios(dense["speed"], c["speed"])["prefill_speedup"], c["perplexity"], _label(c))
              for c in cells] + [(1.0, dense["perplexity"], "dense")]
    front = sorted((p for p in points if not any(q[0] >= p[0] and q[1] <= p[1] and q != p for q in points)))
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.scatter([p[0] for p in points], [p[1] for p in points], color="tab:blue")
    ax.plot([p[0] for p in front], [p[1] for p in front], color="tab:orange", label="Pareto front")
    for x, y, label in points:
        ax.annotate(label, (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set(xlabel="prefill speed-up over dense (measured)", ylabel="perplexity (log scale)", yscale="log",
           title="Structured pruning: speed against quality")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return fig


FIGURES = {"perplexity-vs-sparsity": perplexity_vs_sparsity, "layer-sparsity": layer_sparsity,
           "sensitivity": sensitivity, "recovery": recovery, "pareto": pareto}
