"""SliceGPT against MLP-channel pruning at the same parameter count, on the built-in model (issue 24).

    python benchmarks/slicing.py                       # 4 runs, ~45 min on 2 CPU cores
    python benchmarks/slicing.py --runs slicegpt:0.25

Each run ``slicegpt:F[:per-block]`` slices ``F`` of the hidden width (kept width rounded down to a multiple of
the 9 heads; one rotation for the whole stream, or with ``per-block`` the paper's rotation per point and its
shortcut matrices, see ``secateurs.structured.slicing``), counts the sliced model's parameters (its head is
untied, so it counts twice; shortcut matrices count), then removes from a fresh copy of the dense model as many
MLP channels per block as bring it to that same total (FLAP's fluctuation score with bias compensation, the
channels default).  Both are scored under the quick protocol (calibration 32 x 512 tokens of enwiki train, seed
0, fp32; perplexity on the first 16 x 1024 windows of enwiki test and on the next 24, held out), and timed in the
same process against a copy of the dense model, alternating between the three in each of 7 repeats: prefill
tokens/s on 1 x 512, decode ms/token over 64 tokens with the KV cache (medians).  Whether the sliced folder
loads in plain ``transformers`` (else with ``secateurs.load``) is checked by saving it and loading it back.
Results go to ``benchmarks/results/slicing.{json,md}``.
"""

from __future__ import annotations

import copy
import sys
import tempfile

from common import benchmark_main, measured_on, score

RUNS = ["slicegpt:0.2", "slicegpt:0.25", "slicegpt:0.3", "slicegpt:0.25:per-block"]
CALIB = dict(calib_data="enwiki", calib_samples=32, calib_seqlen=512, seed=0, batch_size=8)
ROUND_TO = 1  # the kept width is still a multiple of the 9 heads (transformers requires it)
REPEATS = 7


def params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def one(run: str) -> dict:
    import torch
    import transformers as tf

    from secateurs import StructuredConfig, calibration_data, load, load_model, prune
    from secateurs.api import environment
    from secateurs.eval import speed
    from secateurs.models import find_blocks
    from secateurs.structured.units import find_mlp

    torch.set_num_threads(2)
    torch.manual_seed(0)
    _, fraction, *rotation = run.split(":")
    fraction, rotation = float(fraction), (rotation or ["shared"])[0]
    dense, tok = load_model("smollm2-135m")
    row = {"run": run, "dense_params": params(dense), "dense_hidden": dense.config.hidden_size}

    sliced = copy.deepcopy(dense)
    cfg = StructuredConfig(method="slicegpt", ratio=fraction, round_to=ROUND_TO, rotation=rotation, **CALIB)
    result = prune(sliced, cfg, calibration_data(tok, cfg), progress=False)
    width = result.structured[0].after
    row.update(rotation=rotation, sliced_params=params(sliced), sliced_hidden=width,
               slice_seconds=round(result.prune_seconds, 2), **score(sliced, tok))
    with tempfile.TemporaryDirectory() as folder:
        sliced.save_pretrained(folder)
        try:
            again, row["loads_with"] = tf.AutoModelForCausalLM.from_pretrained(folder).eval(), "transformers"
        except Exception:  # refused: shortcut matrices
            again, row["loads_with"] = load(folder)[0], "secateurs.load"
        ids = torch.randint(0, 1000, (1, 64), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            row["loaded_identical"] = bool(torch.equal(again(ids).logits, sliced(ids).logits))
        row["sliced_disk_bytes"] = speed.folder_bytes(folder)
        del again

    channels = copy.deepcopy(dense)
    _, blocks = find_blocks(channels)
    mlp = find_mlp(blocks[0])
    per_channel = sum(m.weight.shape[1] for _, m in mlp.inputs) + mlp.output[1].weight.shape[0]
    count = round((row["dense_params"] - row["sliced_params"]) / (per_channel * len(blocks)))
    cfg = StructuredConfig(method="channels", count=count, **CALIB)
    result = prune(channels, cfg, calibration_data(tok, cfg), progress=False)
    scored = score(channels, tok)
    row.update(channels_removed_per_block=count, channels_width=find_mlp(blocks[0]).width,  # after the cut
               channels_params=params(channels),
               channels_seconds=round(result.prune_seconds, 2), channels_perplexity=scored["perplexity"],
               channels_held_out_perplexity=scored["held_out_perplexity"])
    with tempfile.TemporaryDirectory() as folder:
        channels.save_pretrained(folder)
        row["channels_disk_bytes"] = speed.folder_bytes(folder)

    timed = speed.measure_interleaved({"dense": dense, "slicegpt": sliced, "channels": channels}, repeats=REPEATS)
    row["speed"] = timed
    row["dense_perplexity"] = score(dense, tok)["perplexity"] if run == RUNS[0] else None
    row.update(environment())
    return row


def _speeds(r: dict, name: str) -> str:
    dense, other = r["speed"]["dense"], r["speed"][name]
    pre = other["prefill_tokens_per_s"]["median"] / dense["prefill_tokens_per_s"]["median"]
    dec = dense["decode_ms_per_token"]["median"] / other["decode_ms_per_token"]["median"]
    return f"{pre:.2f} | {dec:.2f}"


def markdown(rows: list[dict], command: str) -> str:
    lines = ["# SliceGPT against MLP-channel pruning at the same parameter count (SmolLM2-135M)", "",
             measured_on(rows[0]), "",
             "Quick protocol: calibration 32 x 512 tokens of enwiki train (seed 0), fp32; perplexity on the first "
             "16 x 1024-token windows of enwiki test (held out: the next 24). `slicegpt`: `shared`, one rotation for "
             "the whole stream; `per-block`, the paper's rotation per point with two shortcut matrices per block (they "
             "count); kept width a multiple of the 9 heads, the head untied (its parameters count). `channels`: MLP "
             "channels (fluctuation score, bias compensation) removed from every block until the model has the "
             "sliced one's parameter count. Speed-ups over dense measured in the same process, the three models "
             "alternating in each of 7 repeats: prefill tokens/s on 1 x 512, decode ms/token over 64 tokens "
             "(medians).", "",
             f"Reproduce: `{command}`", "",
             "| run | model | hidden | params | disk MiB | perplexity | held out | prefill × | decode × | prune s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['run']} | slicegpt ({r['rotation']}; loads with {r['loads_with']}) | "
                     f"{r['dense_hidden']}→{r['sliced_hidden']} | {r['sliced_params']:,} | "
                     f"{r['sliced_disk_bytes'] / 2**20:.0f} | {r['perplexity']:.2f} | {r['held_out_perplexity']:.2f} | "
                     f"{_speeds(r, 'slicegpt')} | {r['slice_seconds']} |")
        before = r["channels_width"] + r["channels_removed_per_block"]
        lines.append(f"| {r['run']} | channels | {r['dense_hidden']} (MLP {before}→{r['channels_width']}) | "
                     f"{r['channels_params']:,} | "
                     f"{r['channels_disk_bytes'] / 2**20:.0f} | {r['channels_perplexity']:.2f} | "
                     f"{r['channels_held_out_perplexity']:.2f} | {_speeds(r, 'channels')} | {r['channels_seconds']} |")
    dense = next((r for r in rows if r.get("dense_perplexity") is not None), None)
    lines += ["", f"Dense: {rows[0]['dense_params']:,} parameters"
              + (f", perplexity {dense['dense_perplexity']:.2f}" if dense else "") + ". "
              "Every sliced model, saved and loaded back, gave identical logits: "
              + ("yes" if all(r["loaded_identical"] for r in rows) else "NO") + "."]
    return "\n".join(lines) + "\n"


def progress_line(r: dict) -> str:
    return (f"{r['run']:>24}: slicegpt {r['perplexity']:.3f} ({r['sliced_params']:,} params), channels "
            f"{r['channels_perplexity']:.3f} ({r['channels_params']:,})")


def main() -> int:
    return benchmark_main(__file__, __doc__, RUNS, "slicing", one, markdown, progress_line)


if __name__ == "__main__":
    sys.exit(main())
