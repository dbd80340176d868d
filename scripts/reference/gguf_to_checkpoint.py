#!/usr/bin/env python3
"""A Hugging Face checkpoint folder made by transformers from a GGUF file (weights dequantized,
tokenizer.json and chat template converted), for checking the engine's folder reader on real
models where no hub is reachable. Not committed: the folders are hundreds of megabytes.

  /work/hfenv/bin/pip install torch transformers accelerate gguf sentencepiece
  /work/hfenv/bin/python scripts/reference/gguf_to_checkpoint.py MODEL.gguf OUT_DIR [bfloat16]
"""
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main():
    gguf, out = Path(sys.argv[1]).resolve(), sys.argv[2]
    dtype = getattr(torch, sys.argv[3] if len(sys.argv) > 3 else "bfloat16")
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # transformers will not save a model loaded from GGUF; a plain one with its weights will.
    plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    plain.load_state_dict(quantized.state_dict(), strict=True)
    plain.save_pretrained(out)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
    print(type(plain).__name__, out)


if __name__ == "__main__":
    main()
