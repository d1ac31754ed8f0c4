"""A sweep's ``report.html``: one self-contained file (no network) with its tables and figures.

The figures are also written as PNG files under ``plots/``; in the page they are inline (``data:`` URLs), so
the file can be mailed or committed alone.  A small script in the page counts the figures the browser drew
(``<body data-plots-shown>``), which the browser test reads.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

from .. import atomic
from .tasks import headline

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; } td.name { text-align: left; }
figure { margin: 1em 0 2em; } figure img { max-width: 100%; border: 1px solid #eee; }
.meta { color: #555; font-size: 0.85em; }
"""
COUNT_SHOWN = ("window.addEventListener('load', function () { document.body.dataset.plotsShown = "
               "Array.from(document.images).filter(function (i) { return i.complete && i.naturalWidth > 0; })"
               ".length; });")


def _number(value, digits=3) -> str:
    if value is None or value == "":
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) < 1e5 else f"{value:.3g}"
    return str(value)


def _table(head: list, body: list) -> str:
    cells = lambda row, tag: "".join(  # noqa: E731
        f"<{tag}{' class=name' if k == 0 else ''}>{html.escape(str(v))}</{tag}>" for k, v in enumerate(row))
    return ("<table><thead><tr>" + cells(head, "th") + "</tr></thead><tbody>"
            + "".join("<tr>" + cells(row, "td") + "</tr>" for row in body) + "</tbody></table>")


def _setting(cell: dict, key: str) -> str:
    """A cell's value of a grid key, as its config holds it (so a cell shared by experiments shows each one its
    own axis), else as the sweep gave it (finetune_steps, block, role)."""
    config = cell["config"]
    value = config[key] if key in config else config.get("options", {}).get(key, cell["fields"].get(key))
    if key == "finetune_steps" and value is None:
        value = 0
    return ",".join(map(str, value)) if isinstance(value, list) else _number(value)


def _experiment_table(results: dict, name: str) -> str:
    """One experiment's cells: the settings that vary in it, then the measured figures."""
    from .speed import speed_ratios

    dense = results["dense"]
    cells = [c for c in results["cells"] if name in c["experiments"]]
    if not cells:
        return "<p>No cell measured yet.</p>"
    spec = results["grid"]["experiments"][name]
    sensitive = "sensitivity" in spec
    varying = [k for k, v in spec.items() if isinstance(v, list) and not (sensitive and k == "include")]
    varying += ["block", *(["role"] if spec.get("sensitivity") == "role" else [])] if sensitive else []
    varying = varying or [k for k in spec if k != "sensitivity"]
    tasks = list(dict.fromkeys(t for c in cells for t in headline(c.get("zero_shot") or {})))
    speed = any("speed" in c for c in cells) and "speed" in dense
    head = [*varying, "perplexity", "Δ dense", "sparsity", "params (M)", "prune s", "fine-tune s",
            *(f"{t} {headline(dense.get('zero_shot') or {}).get(t, ('acc',))[0]}" for t in tasks),
            *(["prefill ×", "decode ×"] if speed else [])]
    body = []
    for c in cells:
        scores = headline(c.get("zero_shot") or {})
        row = [_setting(c, k) for k in varying]
        row += [_number(c["perplexity"]), f"{c['perplexity'] - dense['perplexity']:+.3f}", _number(c["sparsity"], 4),
                f"{c['params'] / 1e6:.1f}", _number(c["prune_seconds"], 1), _number(c.get("finetune_seconds"), 1)]
        row += [f"{scores[t][1]:.3f} ± {scores[t][2]:.3f}" if t in scores and scores[t][2] is not None
                else _number(scores.get(t, (0, None))[1]) for t in tasks]
        if speed:
            r = speed_ratios(dense["speed"], c["speed"]) if "speed" in c else {}
            row += [_number(r.get("prefill_speedup"), 2), _number(r.get("decode_speedup"), 2)]
        body.append(row)
    return _table(head, body)


def _dense_summary(results: dict) -> str:
    dense = results["dense"]
    scores = headline(dense.get("zero_shot") or {})
    parts = [f"perplexity {dense['perplexity']:.3f}", f"{dense['params'] / 1e6:.1f} M parameters",
             f"{dense['weight_bytes'] / 2**20:.1f} MiB of weights"]
    parts += [f"{t} {m} {v:.3f}" + (f" ± {se:.3f}" if se is not None else "") for t, (m, v, se) in scores.items()]
    return "<p><b>Dense:</b> " + html.escape(", ".join(parts)) + "</p>"


def render(results: dict, figures: dict) -> str:
    """The page: setup, dense figures, one table per experiment, the figures (``{name: png bytes}``)."""
    setup = results["setup"]
    machine = results.get("machine", {})
    meta = (f"model {setup.get('model')} · measured {results.get('measured_at', '?')} on "
            f"{machine.get('cpu', '?')} · "
            f"{len(results['cells'])} cells{'' if results.get('complete') else ' so far (sweep not finished)'}")
    shared = {k: v for k, v in setup.items() if v not in (None, {}, []) and k != "model"}
    parts = ["<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>secateurs sweep</title>",
             f"<style>{STYLE}</style></head><body>", "<h1>secateurs sweep</h1>",
             f"<p class=meta>{html.escape(meta)}</p>",
             "<p class=meta>Shared settings: " + html.escape("; ".join(f"{k}: {v}" for k, v in shared.items()))
             + "</p>", _dense_summary(results) if results.get("dense") else ""]
    for name in results["grid"]["experiments"]:
        parts += [f"<h2>{html.escape(name)}</h2>", _experiment_table(results, name)]
    if figures:
        parts.append("<h2>Figures</h2>")
    for name, data in figures.items():
        src = "data:image/png;base64," + base64.b64encode(data).decode()
        parts.append(f"<figure id='{name}'><img alt='{name}' src='{src}'><figcaption>{name}</figcaption></figure>")
    parts.append(f"<script>{COUNT_SHOWN}</script></body></html>")
    return "\n".join(parts) + "\n"


def write_report(results: dict, folder) -> dict:
    """Draw every figure the results allow into ``folder/plots/NAME.png`` and write ``folder/report.html``;
    returns ``{name: png bytes}``."""
    from .plots import FIGURES, png

    folder = Path(folder)
    figures = {}
    if results.get("dense") and results["cells"]:
        for name, draw in FIGURES.items():
            fig = draw(results)
            if fig is not None:
                figures[name] = png(fig)
    if figures:
        (folder / "plots").mkdir(exist_ok=True)
    for name, data in figures.items():
        atomic.replace_file(folder / "plots" / f"{name}.png", lambda tmp, data=data: Path(tmp).write_bytes(data))
    atomic.write_text(folder / "report.html", render(results, figures))
    return figures
