#!/usr/bin/env python3
"""transformers' greedy answers and token ids on a checkpoint folder, one JSON line per prompt,
to compare with `refusal-steer generate --model FOLDER` and `refusal-steer tokenize`.
The chat template is applied where the folder has one; otherwise the prompt is sent raw
(compare with `generate --raw`).

  /work/hfenv/bin/python scripts/reference/checkpoint_greedy.py FOLDER PROMPTS.json [TOKENS]
"""
import json, sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main():
    folder, prompts = sys.argv[1], json.load(open(sys.argv[2]))
    max_new = int(sys.argv[3]) if len(sys.argv) > 3 else 40
    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    for p in prompts:
        text = (tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                        add_generation_prompt=True) if tok.chat_template else p)
        ids = tok(text)["input_ids"]
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=max_new, do_sample=False)
        print(json.dumps({"prompt": p, "prompt_ids": ids, "raw_ids": tok(p)["input_ids"],
                          "answer": tok.decode(out[0][len(ids):], skip_special_tokens=True)},
                         ensure_ascii=False))


if __name__ == "__main__":
    main()
