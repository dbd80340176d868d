#!/usr/bin/env python3
"""transformers' tokens and logits on the engine's tiny Hugging Face checkpoints, and the
same checkpoints converted to GGUF by llama.cpp's own converter.

Writes the tiny checkpoint folders (`cargo run --example write_tiny`), loads each with
transformers (float32, eager attention) and keeps, per folder: the token ids its tokenizer
gives for a few texts, the top logits at every position of fixed token sequences, and for
CHATS chat prompts (rendered by the folder's chat template) the top logits at every position
and the greedy continuation: fixtures/transformers/tiny/logits-<variant>.json. With
--llama-cpp DIR it also converts each folder with DIR's convert_hf_to_gguf.py (through
convert_with_llama_cpp.py) to f32 and Q8_0: fixtures/llama.cpp/converted/tiny-<variant>-<type>.gguf.
crates/engine/tests/tiny_hf_parity.rs checks both. Nothing from transformers or llama.cpp is
copied; only their outputs.

  python3 -m venv /work/hfenv && /work/hfenv/bin/pip install torch transformers
  /work/hfenv/bin/python scripts/reference/make_tiny_hf_fixtures.py --llama-cpp LLAMA_CPP_SRC
"""
import argparse, copy, hashlib, json, random, subprocess, sys, tempfile
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parents[2]
VARIANTS = ["llama3", "qwen2", "qwen3", "gemma3", "qwen3moe"]
TOP_K = 8
# Chat prompts are longer (a byte-level vocabulary of 288): fewer top logits keep the file small.
CHAT_TOP_K = 4
GREEDY_TOKENS = 12
CHATS = ["Hi!", "What is 2 + 2?", "Tell me a joke.", "Why is the sky blue?", "Name three fruits.",
         "Translate 'good morning' into French.", "Write a haiku about rain.", "Who wrote Hamlet?",
         "列出三种颜色。", "你好，今天怎么样？", "What happened in 1989?", "Summarise: cats sleep a lot.",
         "Is 17 prime?", "Give me a word that rhymes with 'light'.", "def f(x): return x*2 — what is f(3)?",
         "Spell 'necessary'.", "How far is the Moon?", "Recommend a book 📚", "What's the capital of Peru?",
         "Count from one to five."]
CONVERTED_TYPES = ["f32", "q8_0"]
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
    ap.add_argument("--llama-cpp", help="llama.cpp source tree whose convert_hf_to_gguf.py to run")
    ap.add_argument("--converted", default=str(ROOT / "fixtures/llama.cpp/converted"))
    args = ap.parse_args()
    out = Path(args.out)
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
            chats = [chat(model, tokenizer, prompt) for prompt in CHATS]
            fixture = {"variant": variant, "class": type(model).__name__,
                       "sha256": folder_sha256(folder),
                       "transformers": transformers.__version__, "torch": torch.__version__,
                       "top_k": TOP_K, "tokens": tokens, "cases": cases, "chats": chats,
                       "q8_0_weight_effect": q8_0_weight_effect(model, cases + chats)}
            (out / f"logits-{variant}.json").write_text(json.dumps(fixture) + "\n")
            print(variant, fixture["class"], fixture["sha256"][:12], len(cases), "cases")
            if args.llama_cpp:
                convert(Path(args.llama_cpp), folder, Path(args.converted), variant)


def chat(model, tokenizer, prompt):
    """The rendered prompt's ids, top logits at every position, and greedy continuation."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                        add_generation_prompt=True, tokenize=True,
                                        return_dict=False)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
        # Plain argmax at every step: generate()'s processors would mask the end token.
        greedy, sequence = [], list(ids)
        for _ in range(GREEDY_TOKENS):
            greedy.append(int(model(torch.tensor([sequence])).logits[0, -1].argmax()))
            sequence.append(greedy[-1])
    top = torch.topk(logits, CHAT_TOP_K, dim=-1)
    return {"prompt": prompt, "ids": ids, "top_ids": top.indices.tolist(),
            "top_logits": [[round(v, 6) for v in row] for row in top.values.tolist()],
            "greedy": greedy}


def q8_0_weight_effect(model, runs):
    """How far transformers' logits move (largest |change| over the recorded top logits) when
    every matrix the converter stores as Q8_0 (all but the norms, biases and MoE router) is
    rounded to Q8_0 and back: the part of a Q8_0 file's error that its weights explain."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in rounded.named_parameters():
            if p.dim() >= 2 and not name.endswith("mlp.gate.weight"):
                w = p.detach().float().numpy()
                q8 = quantize(w, GGMLQuantizationType.Q8_0)
                p.copy_(torch.from_numpy(dequantize(q8, GGMLQuantizationType.Q8_0).reshape(w.shape)))
    worst = 0.0
    for run in runs:
        with torch.no_grad():
            logits = rounded(torch.tensor([run["ids"]])).logits[0]
        for pos, (ids, reference) in enumerate(zip(run["top_ids"], run["top_logits"])):
            worst = max(worst, max(abs(float(logits[pos, i]) - r) for i, r in zip(ids, reference)))
    return worst


def convert(llama_cpp, folder, converted, variant):
    converted.mkdir(parents=True, exist_ok=True)
    for outtype in CONVERTED_TYPES:
        target = converted / f"tiny-{variant}-{outtype}.gguf"
        subprocess.run([sys.executable, str(Path(__file__).parent / "convert_with_llama_cpp.py"),
                        str(llama_cpp), str(folder), "--outtype", outtype, "--outfile", str(target)],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        print("  converted", target.name)


if __name__ == "__main__":
    main()
