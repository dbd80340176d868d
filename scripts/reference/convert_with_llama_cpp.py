#!/usr/bin/env python3
"""Run llama.cpp's own convert_hf_to_gguf.py on a tiny Hugging Face checkpoint folder.

The converter names a byte-level BPE pre-tokenizer by hashing the token ids of a fixed text;
a tiny vocabulary matches no known hash, so it would stop there. This wrapper answers that one
question from the tokenizer.json's split regex (the same recognition the engine's
`tokenizer::hf` does) and leaves every other step of the conversion to the converter.

  /work/hfenv/bin/python scripts/reference/convert_with_llama_cpp.py LLAMA_CPP_DIR FOLDER \\
      --outtype f32 --outfile OUT.gguf
"""
import json
import sys
from pathlib import Path

# The split regexes of the pre-tokenizers the tiny folders use, by llama.cpp's name.
PRE_BY_REGEX = {
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+": "qwen2",
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+": "llama-bpe",
}


def pre_tokenizer_name(folder: Path) -> str:
    spec = json.loads((folder / "tokenizer.json").read_text())["pre_tokenizer"]
    for step in spec.get("pretokenizers", [spec]):
        regex = step.get("pattern", {}).get("Regex")
        if regex in PRE_BY_REGEX:
            return PRE_BY_REGEX[regex]
    sys.exit(f"{folder}: its pre-tokenizer is none of the tiny folders'; add its regex to PRE_BY_REGEX")


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    llama_cpp, folder = Path(sys.argv[1]), Path(sys.argv[2])
    pre = pre_tokenizer_name(folder)
    sys.path.insert(0, str(llama_cpp))
    sys.path.insert(1, str(llama_cpp / "gguf-py"))
    from conversion.base import TextModel
    TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
    import convert_hf_to_gguf
    sys.argv = ["convert_hf_to_gguf.py", str(folder), *sys.argv[3:]]
    convert_hf_to_gguf.main()


if __name__ == "__main__":
    main()
