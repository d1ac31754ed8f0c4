"""What the benchmark scripts share: one fresh process per run, and the header that says where it ran."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path


def run_each(script: str, runs: list, extra: list, on_row) -> list[dict]:
    """Run ``script --one RUN *extra`` in a fresh process per run (its own peak RSS and timings); the last
    stdout line is the row as JSON.  ``on_row(rows, seconds)`` is called after each, e.g. to save them."""
    rows = []
    for run in runs:
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, script, "--one", run, *extra], capture_output=True, text=True)
        if proc.returncode:
            sys.stderr.write(proc.stderr)
            raise SystemExit(f"run {run} failed")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        on_row(rows, time.perf_counter() - t)
    return rows


def build_apart(module: str, name: str) -> None:
    """``module.build_checkpoint(name)`` (a benchmark script beside this one) in a process of its own: a child
    forked from a process that held the building's memory would report that memory as its own peak (Linux
    keeps the pre-exec high-water mark in ``ru_maxrss``), and a run in this process would count it."""
    subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                    f"import {module}; {module}.build_checkpoint({name!r})"], check=True)


def finish_checkpoint(tmp: Path, folder: Path) -> Path:
    """Give a random-weight checkpoint built in ``tmp`` the built-in model's tokenizer (ids < 49,152, within
    every vocabulary the benchmarks build) and move it into place as ``folder``: a half-built one is never
    taken for a finished one."""
    from secateurs.models.load import load_model

    _, tokenizer = load_model()
    tokenizer.save_pretrained(tmp)
    tmp.rename(folder)
    return folder


def folder_bytes(folder: Path) -> int:
    """The bytes of a folder's safetensors files."""
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def rss_bytes() -> int:
    """This process's resident set now (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """``with PeakRSS() as m: ...`` -- a thread samples the resident set every ``interval`` seconds while the
    block runs; ``m.before`` is the resident set on entry and ``m.peak`` the largest seen (bytes)."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval

    def __enter__(self) -> "PeakRSS":
        self.before = self.peak = rss_bytes()
        self._running = True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while self._running:
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        self._running = False
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def measured_on(env: dict) -> str:
    """``Measured <date> on <cpu> (...), torch ..., transformers ..., secateurs ...``; the date is the run's
    own (``measured_at``), or today's for rows saved before runs recorded it."""
    date = env.get("measured_at", time.strftime("%Y-%m-%d"))[:10]
    return (f"Measured {date} on {env['machine']['cpu']} ({env['machine']['cores']} cores, "
            f"torch threads 2), torch {env['versions']['torch']}, transformers {env['versions']['transformers']}, "
            f"secateurs {env['versions']['secateurs']}; allocator: "
            f"{env['machine'].get('allocator', 'system default')}.")


def page_head(title: str, row: dict, intro: str, command: str) -> list[str]:
    """The first lines of a results page: title, where and when (from ``row``), what was run, how to rerun it."""
    return [f"# {title}", "", measured_on(row), "", intro, "", f"Reproduce: `{command}`", ""]


PROTOCOL_WINDOWS, HELD_OUT_WINDOWS, SEQLEN = 16, 24, 1024
CALIB_SAMPLES, CALIB_SEQLEN, BATCH = 32, 512, 8
TARGET_RATIO = {"wanda": 1.6, "sparsegpt": 2.0}  # issue 2: prune wall time / one dense forward
# the official reference code (Wanda's repository) on the same protocol, CPU (issue 2)
REFERENCE_RATIO = {"wanda:0.5": 1.9, "sparsegpt:0.5": 3.4, "wanda:2:4": 1.9, "sparsegpt:2:4": 3.4}


def protocol_config(method: str, setting: str, **options):
    """The quick protocol's :class:`PruneConfig` for ``method`` at ``setting`` (``0.5`` or ``N:M``): calibration
    32 x 512 tokens of enwiki train, seed 0, batch 8, with extra config ``options``."""
    from secateurs import PruneConfig

    nm = ":" in setting
    return PruneConfig(method=method, pattern=setting if nm else "unstructured",
                       sparsity=None if nm else float(setting), calib_data="enwiki", calib_samples=CALIB_SAMPLES,
                       calib_seqlen=CALIB_SEQLEN, seed=0, batch_size=BATCH, **options)


def dense_forward_seconds(model, calib) -> float:
    """Wall time of one plain forward of ``model`` (logits and all) over the calibration tokens, batch 8."""
    import torch

    t = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(calib), BATCH):
            model(calib[i : i + BATCH], use_cache=False)
    return time.perf_counter() - t


def prune_and_score(method: str, setting: str, **options) -> dict:
    """Quick protocol (shared/DATA.md) for ``method`` at ``setting`` (``0.5`` or ``N:M``) with extra
    :class:`PruneConfig` ``options``; perplexity on the protocol's windows (the first 16 x 1024 tokens of
    enwiki test) and on the next 24 windows, held out so that no choice is made on the reported figures."""
    import torch

    from secateurs import calibration_data, load_model, prune
    from secateurs.api import environment

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model, tok = load_model("smollm2-135m")
    cfg = protocol_config(method, setting, **options)
    result = prune(model, cfg, calibration_data(tok, cfg), progress=False)
    return {"method": method, "pattern": cfg.pattern, "true_sequential": cfg.resolved.true_sequential, "refine": cfg.refine,
            "sparsity": result.sparsity, "prune_seconds": round(result.prune_seconds, 2),
            **score(model, tok), **environment()}


def score(model, tok) -> dict:
    """``perplexity`` on the quick protocol's windows and ``held_out_perplexity`` on the next 24."""
    from secateurs import EvalConfig, evaluate
    from secateurs.data import load_text, tokenize

    ids = tokenize(tok, load_text("enwiki", "test"))
    return {"perplexity": evaluate(model, tok, EvalConfig(seqlen=SEQLEN, windows=PROTOCOL_WINDOWS), ids=ids,
                                   progress=False),
            "held_out_perplexity": evaluate(model, tok, EvalConfig(seqlen=SEQLEN, windows=HELD_OUT_WINDOWS),
                                            ids=ids[PROTOCOL_WINDOWS * SEQLEN:], progress=False)}


def held_out_markdown(script: str, rows: list[dict], title: str, intro: str, column: str, cell) -> str:
    """The results page of ``script``: ``| method | pattern | <column> | protocol ppl | held-out ppl | prune s |``,
    with ``cell(row)`` filling ``column``."""
    lines = [f"# {title} (SmolLM2-135M, quick protocol)", "", measured_on(rows[0]), "",
             "Calibration 32 x 512 tokens of enwiki train (seed 0), batch 8, fp32. `protocol` = perplexity on the "
             "first 16 x 1024-token windows of enwiki test (the quick protocol); `held out` = the next 24 windows. "
             + intro, "", f"Reproduce: `python benchmarks/{Path(script).name}`", "",
             f"| method | pattern | {column} | protocol ppl | held-out ppl | prune s |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['pattern']} | {cell(r)} | {r['perplexity']:.2f} | "
                     f"{r['held_out_perplexity']:.2f} | {r['prune_seconds']:.1f} |")
    return "\n".join(lines + [""])


def benchmark_main(script: str, doc: str, runs: list, stem: str, one, markdown, describe, plot=None) -> int:
    """The command line the benchmarks share: ``--runs`` (comma list, default all), ``--out`` (folder for
    ``<stem>.json`` and ``<stem>.md``) and the hidden ``--one RUN``, which measures one row in this process.
    Each row runs in a fresh process that reuses freed memory as the command line does
    (:func:`secateurs.reuse_freed_memory`); both files are rewritten after every row, so a crash loses nothing
    measured.  ``markdown(rows, command)`` renders the page, ``describe(row)`` the progress line and ``plot(rows, path)``,
    if given, draws the figure the page shows."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--runs", default=",".join(runs), help="comma list of runs (default: all of them)")
    parser.add_argument("--out", default=str(Path(script).resolve().parent / "results"),
                        help=f"folder for {stem}.json and {stem}.md")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--page-only", action="store_true",
                        help=f"only redraw {stem}.md (and its plot) from the rows already in {stem}.json")
    args = parser.parse_args()
    if args.one:
        from secateurs import reuse_freed_memory

        reuse_freed_memory()  # as the command line does
        print(json.dumps(one(args.one)))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = f"python benchmarks/{Path(script).name}" + ("" if args.runs == ",".join(runs) else f" --runs {args.runs}")

    def on_row(rows, seconds):
        print(f"{describe(rows[-1])} ({seconds:.0f} s)", flush=True)
        (out / f"{stem}.json").write_text(json.dumps(rows, indent=2) + "\n")
        (out / f"{stem}.md").write_text(markdown(rows, command))
        if plot is not None:
            plot(rows, out / f"{stem}.png")

    if args.page_only:
        rows = json.loads((out / f"{stem}.json").read_text())
        command = f"python benchmarks/{Path(script).name}" + ("" if [r["run"] for r in rows] == runs else
                                                               f" --runs {','.join(r['run'] for r in rows)}")
        (out / f"{stem}.md").write_text(markdown(rows, command))
        if plot is not None:
            plot(rows, out / f"{stem}.png")
        return 0
    rows = run_each(script, [r.strip() for r in args.runs.split(",") if r.strip()], [], on_row)
    print(markdown(rows, command))
    return 0


def held_out_main(script: str, doc: str, runs: list, stem: str, one, markdown) -> int:
    """:func:`benchmark_main` for rows from :func:`prune_and_score`; ``markdown(rows)`` renders the page."""
    return benchmark_main(script, doc, runs, stem, one, lambda rows, command: markdown(rows),
                          lambda r: f"{r['run']:>28}: ppl {r['perplexity']:.3f}, held out "
                                    f"{r['held_out_perplexity']:.3f}, prune {r['prune_seconds']:.1f} s")
