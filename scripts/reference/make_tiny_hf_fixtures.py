#!/usr/bin/env python3
"""transformers' tokens and logits on the engine's tiny Hugging Face checkpoints.

Writes the tiny checkpoint folders (`cargo run --example write_tiny`), loads each with
transformers (float32, eager attention) and keeps, per folder: the token ids its tokenizer
gives for a few texts, and the top logits at every position of fixed token sequences:
fixtures/transformers/tiny/logits-<variant>.json, checked by
crates/engine/tests/tiny_hf_parity.rs. Nothing from transformers is copied; only its outputs.

  python3 -m venv /work/hfenv && /work/hfenv/bin/pip install torch transformers
  /work/hfenv/bin/python scripts/reference/make_tiny_hf_fixtures.py
"""
import argparse, hashlib, json, random, subprocess, tempfile
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parents[2]
VARIANTS = ["llama3", "qwen2", "qwen3", "gemma3", "qwen3moe"]
TOP_K = 8
TEXTS = ["Hello there, the in 1234!", "  two  spaces\n\nand lines\r\n", "I'm HE'LL 56789 théâtre",
         "<|im_start|>user\nthe end<|im_end|>\n", "中文 and emoji 🙂"]


def sequences():
    rng = random.Random(7)
    # Byte tokens only (ids < 256), lengths that cross the sliding window and rope periods.
    return [[rng.randrange(256) for _ in range(n)] for n in (5, 24, 60)]


def folder_sha256(folder):
    """The engine's checkpoint identity: sha256 of `sha256sum`'s lines for its files."""
    lines = "".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}\n"
                    for p in sorted(folder.iterdir()) if p.is_file())
    return hashlib.sha256(lines.encode()).hexdigest()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "fixtures/transformers/tiny"))
    out = Path(ap.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run(["cargo", "run", "--release", "-q", "-p", "refusal-steer-engine",
                        "--example", "write_tiny", "--", tmp], check=True, cwd=ROOT,
                       stdout=subprocess.DEVNULL)
        for variant in VARIANTS:
            folder = tmp / f"tiny-hf-{variant}"
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                         attn_implementation="eager").eval()
            tokenizer = AutoTokenizer.from_pretrained(folder)
            tokens = [{"text": t, "ids": tokenizer(t)["input_ids"]} for t in TEXTS]
            cases = []
            for ids in sequences():
                with torch.no_grad():
                    logits = model(torch.tensor([ids])).logits[0]
                top = torch.topk(logits, TOP_K, dim=-1)
                cases.append({"ids": ids, "top_ids": top.indices.tolist(),
                              "top_logits": top.values.tolist()})
            fixture = {"variant": variant, "class": type(model).__name__,
                       "sha256": folder_sha256(folder),
                       "transformers": transformers.__version__, "torch": torch.__version__,
                       "top_k": TOP_K, "tokens": tokens, "cases": cases}
            (out / f"logits-{variant}.json").write_text(json.dumps(fixture) + "\n")
            print(variant, fixture["class"], fixture["sha256"][:12], len(cases), "cases")


if __name__ == "__main__":
    main()
