#!/usr/bin/env python3
"""Reads a difflab run's TensorBoard logs with TensorBoard's own EventAccumulator and checks
them: every expected tag present, steps increasing, values finite, histogram bucket counts
summing to `num`, images decoding as PNG of the stated size.

Usage: check_tensorboard.py RUN_DIR [--differential] [--figures]
Needs: pip install tensorboard (scripts/test.sh sets up .venv with it).
Prints a JSON summary; exits 1 with the failed checks listed otherwise."""

import io
import json
import math
import sys

from PIL import Image
from tensorboard.backend.event_processing import event_accumulator as ea


def main() -> int:
    run_dir = sys.argv[1]
    differential = "--differential" in sys.argv
    figures = "--figures" in sys.argv
    acc = ea.EventAccumulator(f"{run_dir}/runs", size_guidance={ea.SCALARS: 0, ea.HISTOGRAMS: 0, ea.IMAGES: 0})
    acc.Reload()
    tags = acc.Tags()
    problems = []

    scalars = ["train/loss", "train/learning_rate", "train/grad_norm", "train/tokens_per_second", "eval/loss", "eval/perplexity"]
    if differential:
        scalars += [f"research/diff_norm_{s}" for s in ("mean", "std", "min", "max")]
    # per-layer gradient norms and update/weight ratios: every layer the run has
    layers = sorted({t.split("/")[2] for t in tags["scalars"] if t.startswith("layers/grad_norm/")})
    if not layers or "wte" not in layers or "ln_f" not in layers or not any(l.startswith("h.") for l in layers):
        problems.append(f"per-layer scalars missing: layers {layers}")
    scalars += [f"layers/{kind}/{l}" for l in layers for kind in ("grad_norm", "update_ratio")]
    for tag in scalars:
        if tag not in tags["scalars"]:
            problems.append(f"scalar {tag} missing")
            continue
        events = acc.Scalars(tag)
        steps = [e.step for e in events]
        if not events:
            problems.append(f"{tag}: no values")
        if any(b <= a for a, b in zip(steps, steps[1:])):
            problems.append(f"{tag}: steps not increasing: {steps[:20]}")
        if not all(math.isfinite(e.value) for e in events):
            problems.append(f"{tag}: non-finite values")

    histograms = 0
    if differential:
        if "research/diff_norm" not in tags["histograms"]:
            problems.append("histogram research/diff_norm missing")
        else:
            for h in acc.Histograms("research/diff_norm"):
                v = h.histogram_value
                histograms += 1
                if abs(sum(v.bucket) - v.num) > 1e-9:
                    problems.append(f"histogram at step {h.step}: buckets sum to {sum(v.bucket)}, num {v.num}")
                if len(v.bucket) != len(v.bucket_limit) or not (v.min <= v.max):
                    problems.append(f"histogram at step {h.step}: malformed")

    images = 0
    if figures:
        wanted = ["figures/loss", "figures/loss_log", "figures/learning_rate", "figures/grad_norm", "figures/position_loss"] + (["figures/diff_norm_hist"] if differential else [])
        for tag in wanted:
            if tag not in tags["images"]:
                problems.append(f"image {tag} missing")
                continue
            for im in acc.Images(tag):
                images += 1
                png = Image.open(io.BytesIO(im.encoded_image_string))
                if png.format != "PNG" or png.size != (im.width, im.height):
                    problems.append(f"{tag} at step {im.step}: {png.format} {png.size} vs stated {im.width}x{im.height}")
    elif tags["images"]:
        problems.append(f"images written with figures off: {tags['images']}")

    summary = {
        "scalars": sorted(tags["scalars"]),
        "layers": layers,
        "points": {t: len(acc.Scalars(t)) for t in tags["scalars"]},
        "histograms": histograms,
        "images": images,
        "problems": problems,
    }
    print(json.dumps(summary))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
