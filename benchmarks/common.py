"""What the benchmark scripts share: one fresh process per run, and the header that says where it ran."""

from __future__ import annotations

import json
import subprocess
import sys
import time


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


def measured_on(env: dict) -> str:
    """``Measured <date> on <cpu> (...), torch ..., transformers ..., secateurs ...``."""
    return (f"Measured {time.strftime('%Y-%m-%d')} on {env['machine']['cpu']} ({env['machine']['cores']} cores, "
            f"torch threads 2), torch {env['versions']['torch']}, transformers {env['versions']['transformers']}, "
            f"secateurs {env['versions']['secateurs']}.")
