"""The peer side of scripts/bench/capture_vs_pytorch.sh: the same capture as `refusal-steer
capture --position last-prompt`, done with transformers/PyTorch on CPU.

The GGUF file is loaded by transformers (`gguf_file=`; it dequantizes to fp32), each prompt is
formatted with the model's chat template (generation prompt added), and the residual stream
after every block (`output_hidden_states=True`) is kept at the last prompt token. Batches are
left-padded with explicit position ids, so padding changes no row.

    python capture_vs_pytorch.py MODEL.gguf PROMPTS.jsonl BATCH OUT.npy

Prints one JSON line: prompts, batch, threads, load and capture seconds, prompts/s of the
capture loop and of the whole process so far, and the mean number of prompt tokens.
"""

import json
import os
import sys
import time

START = time.perf_counter()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402


def main():
    model_path, prompts_path, batch, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    threads = int(os.environ.get("THREADS", "1"))
    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)
    folder, name = os.path.split(os.path.abspath(model_path))
    prompts = [json.loads(line)["prompt"] for line in open(prompts_path) if line.strip()]

    load_start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.eval()
    load_s = time.perf_counter() - load_start

    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        for p in prompts
    ]
    rows, n_tokens = [], []
    capture_start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(texts), batch):
            enc = tokenizer(
                texts[i : i + batch], return_tensors="pt", padding=True, add_special_tokens=False
            )
            mask = enc["attention_mask"]
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            outputs = model(
                input_ids=enc["input_ids"],
                attention_mask=mask,
                position_ids=positions,
                output_hidden_states=True,
                use_cache=False,
            )
            # [points, rows, d] at the last token (left padding puts it last in every row).
            last = torch.stack([h[:, -1, :] for h in outputs.hidden_states])
            rows.append(last.transpose(0, 1).float().numpy())
            n_tokens.extend(mask.sum(-1).tolist())
    capture_s = time.perf_counter() - capture_start
    np.save(out, np.concatenate(rows))
    print(
        json.dumps(
            {
                "prompts": len(prompts),
                "batch": batch,
                "threads": torch.get_num_threads(),
                "load_s": load_s,
                "capture_s": capture_s,
                "prompts_per_s": len(prompts) / capture_s,
                "prompts_per_s_end_to_end": len(prompts) / (time.perf_counter() - START),
                "mean_prompt_tokens": sum(n_tokens) / len(n_tokens),
                "torch": torch.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
