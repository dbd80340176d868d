#!/usr/bin/env python3
"""How often two sets of llama.cpp fixtures (make_fixtures.py outputs) agree on greedy
continuations and on the top-1 token at prompt positions, per family.

    python3 scripts/reference/compare_greedy.py fixtures/llama.cpp /tmp/ref-fa
    python3 scripts/reference/compare_greedy.py --keep fixtures/llama.cpp/flash-attn /tmp/ref-fa

With --keep DIR, B's greedy continuations and prompt-position top-1 tokens are written to
DIR/greedy-<family>.json (small enough to commit), and nothing is compared.

Used to measure llama.cpp against itself (e.g. plain vs flash attention): the agreement our
engine can be expected to reach with one llama.cpp configuration is bounded by how stable the
greedy path is under changes of the same size as ours.
"""
import json
import sys
from pathlib import Path


def keep(out: Path, src: Path):
    out.mkdir(parents=True, exist_ok=True)
    for family in ("llama", "qwen2", "gemma3"):
        f = src / f"logits-{family}.json"
        if f.is_file():
            prompts = [
                {"prompt": p["prompt"], "greedy": p["greedy"], "top1": [t[0] for t in p["top_ids"]]}
                for p in json.loads(f.read_text())["prompts"]
            ]
            (out / f"greedy-{family}.json").write_text(json.dumps({"prompts": prompts}) + "\n")


def main():
    if sys.argv[1] == "--keep":
        return keep(Path(sys.argv[2]), Path(sys.argv[3]))
    a_dir, b_dir = map(Path, sys.argv[1:3])
    for family in ("llama", "qwen2", "gemma3"):
        a_file, b_file = a_dir / f"logits-{family}.json", b_dir / f"logits-{family}.json"
        if not (a_file.is_file() and b_file.is_file()):
            continue
        a, b = (json.loads(f.read_text())["prompts"] for f in (a_file, b_file))
        same = top1_diff = positions = 0
        max_delta = 0.0
        parted = []
        for pa, pb in zip(a, b):
            assert pa["ids"] == pb["ids"], f"{family}: different prompts"
            for ta, tb, la, lb in zip(pa["top_ids"], pb["top_ids"], pa["top_logits"], pb["top_logits"]):
                positions += 1
                top1_diff += ta[0] != tb[0]
                lookup = dict(zip(tb, lb))
                for i, l in zip(ta, la):
                    if i in lookup:
                        max_delta = max(max_delta, abs((l - la[0]) - (lookup[i] - lookup.get(ta[0], lb[0]))))
            if pa["greedy"] == pb["greedy"]:
                same += 1
            else:
                common = next(i for i, (x, y) in enumerate(zip(pa["greedy"] + [None], pb["greedy"] + [None])) if x != y)
                parted.append(f"{pa['prompt']!r}: same for {common} tokens (margin there {pa['greedy_margin'][common] if common < len(pa['greedy_margin']) else 'n/a'})")
        print(f"{family}: greedy identical {same}/{len(a)}; top-1 differs at {top1_diff}/{positions} prompt positions; max |dlogit| rel. to top {max_delta:.3f}")
        for p in parted:
            print(f"  parts: {p}")


if __name__ == "__main__":
    main()
