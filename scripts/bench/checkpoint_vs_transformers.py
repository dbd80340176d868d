#!/usr/bin/env python3
"""Prefill and decode speed on one checkpoint folder: refusal-steer's `bench` against
transformers (float32, eager attention, KV cache), same threads, measured in the same run;
prints tokens/s and the ratio. A benchmark, not a test.

  /work/hfenv/bin/python scripts/bench/checkpoint_vs_transformers.py FOLDER [--threads 1 2]
"""
import argparse, json, subprocess, time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[2]


def transformers_speed(model, pp, tg, reps):
    ids = torch.randint(100, 1000, (1, pp))
    best_pp, best_tg = 0.0, 0.0
    with torch.no_grad():
        for _ in range(reps):
            start = time.perf_counter()
            model(ids)
            best_pp = max(best_pp, pp / (time.perf_counter() - start))
            out = model(ids[:, :1], use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            start = time.perf_counter()
            for _ in range(tg):
                out = model(token, past_key_values=cache, use_cache=True)
                cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            best_tg = max(best_tg, tg / (time.perf_counter() - start))
    return {"pp%d" % pp: best_pp, "tg%d" % tg: best_tg}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("folder")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--pp", type=int, default=128)
    ap.add_argument("--tg", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    ours_bin = ROOT / "target/release/refusal-steer"
    model = AutoModelForCausalLM.from_pretrained(args.folder, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    print("%3s %6s %12s %14s %7s" % ("thr", "test", "ours tok/s", "transformers", "ratio"))
    for t in args.threads:
        torch.set_num_threads(t)
        theirs = transformers_speed(model, args.pp, args.tg, args.reps)
        ours = json.loads(subprocess.run(
            [ours_bin, "--threads", str(t), "bench", "--model", args.folder,
             "--prompt-tokens", str(args.pp), "--gen-tokens", str(args.tg),
             "--repetitions", str(args.reps)], capture_output=True, text=True, check=True).stdout)
        for r in ours["results"]:
            other = theirs[r["test"]]
            print("%3d %6s %12.1f %14.1f %6.2fx" % (t, r["test"], r["tokens_per_second"], other,
                                                    r["tokens_per_second"] / other))


if __name__ == "__main__":
    main()
