#!/usr/bin/env python3
"""Loads a difflab output directory with Hugging Face transformers and compares its logits
with difflab's own, for the same token ids.

A plain baseline (rope false, research false) is saved as `model_type: gpt2`, so
`GPT2LMHeadModel.from_pretrained(RUN_DIR)` must load it and give the same logits; other
variants carry `model_type: difflab`, which transformers refuses instead of loading wrongly.

Set-up (PyPI's torch wheel is large; a virtual environment outside the repository):
    python3 -m venv ~/venvs/torchref
    ~/venvs/torchref/bin/pip install torch transformers safetensors numpy
Usage:
    ~/venvs/torchref/bin/python scripts/hf_check.py RUN_DIR [--difflab target/release/difflab]
Prints the largest absolute logit difference; exits 1 above 1e-4."""

import argparse
import json
import subprocess
import sys

import torch
from transformers import AutoConfig, GPT2LMHeadModel


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("--difflab", default="target/release/difflab")
    ap.add_argument("--tolerance", type=float, default=1e-4)
    args = ap.parse_args()

    config = json.load(open(f"{args.run_dir}/config.json"))
    n = min(64, config["n_positions"])
    ids = [(i * 7919 + 13) % config["vocab_size"] for i in range(n)]
    out = subprocess.run([args.difflab, "logits", "--checkpoint", args.run_dir, "--ids", ",".join(map(str, ids))],
                         check=True, capture_output=True, text=True).stdout
    ours = torch.tensor(json.loads(out)["logits"])

    if config["model_type"] != "gpt2":
        try:
            AutoConfig.from_pretrained(args.run_dir)
            print(json.dumps({"model_type": config["model_type"], "error": "transformers accepted a non-GPT-2 model_type"}))
            return 1
        except (ValueError, KeyError) as e:
            print(json.dumps({"model_type": config["model_type"], "transformers_refuses": str(e).splitlines()[0]}))
            return 0

    model = GPT2LMHeadModel.from_pretrained(args.run_dir).eval()
    with torch.no_grad():
        theirs = model(torch.tensor([ids])).logits[0]
    diff = (theirs - ours).abs().max().item()
    print(json.dumps({"model_type": "gpt2", "tokens": n, "vocab": config["vocab_size"],
                      "max_abs_logit_diff": diff, "logit_abs_max": ours.abs().max().item(),
                      "transformers": __import__("transformers").__version__, "torch": torch.__version__}))
    return 0 if diff <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
