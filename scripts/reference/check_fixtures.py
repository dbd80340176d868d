#!/usr/bin/env python3
"""Structural sanity checks for fixtures/llama.cpp (no llama.cpp needed).

Usage: python3 scripts/reference/check_fixtures.py [fixtures/llama.cpp]
"""
import json
import sys
from pathlib import Path

d = Path(sys.argv[1] if len(sys.argv) > 1 else "fixtures/llama.cpp")
meta = json.loads((d / "meta.json").read_text())
ok = True


def fail(msg):
    global ok
    ok = False
    print("FAIL:", msg)


texts_by_family = {}
for fam, m in meta["models"].items():
    n_vocab = m["n_vocab"]
    rows = [json.loads(l) for l in (d / f"tokenize-{fam}.jsonl").read_text().splitlines()]
    texts_by_family[fam] = [r["text"] for r in rows]
    if len(rows) < 70:
        fail(f"{fam}: only {len(rows)} tokenize strings")
    for r in rows:
        if r["text"] and not r["ids"]:
            fail(f"{fam}: empty ids for {r['text']!r}")
        if not r["text"] and r["ids"]:
            fail(f"{fam}: non-empty ids for empty string")
        if any(not (0 <= i < n_vocab) for i in r["ids"]):
            fail(f"{fam}: id out of range for {r['text']!r}")
        if r["detok"] != r["text"]:
            print(f"note: {fam}: detok differs for {r['text']!r}: {r['detok']!r}")
    bos_rows = [json.loads(l) for l in (d / f"tokenize-{fam}-bos.jsonl").read_text().splitlines()]
    for r in bos_rows:
        if m["add_bos"] and (not r["ids"] or r["ids"][0] != m["bos"]):
            fail(f"{fam}: add_bos model but first id is not BOS for {r['text']!r}")

    lf = d / f"logits-{fam}.json"
    doc = json.loads(lf.read_text())
    size = lf.stat().st_size
    if size > 1_100_000:
        fail(f"{fam}: {lf} is {size} bytes")
    if len(doc["prompts"]) != 24:
        fail(f"{fam}: {len(doc['prompts'])} prompts")
    n_eog = 0
    for p in doc["prompts"]:
        n = len(p["ids"])
        if n == 0 or len(p["top_ids"]) != n or len(p["top_logits"]) != n:
            fail(f"{fam}: shape mismatch for {p['prompt']!r}")
        for ids, lg in zip(p["top_ids"], p["top_logits"]):
            if len(ids) != 8 or len(lg) != 8 or any(lg[i] < lg[i + 1] for i in range(7)):
                fail(f"{fam}: bad top-8 row for {p['prompt']!r}")
                break
        if p["greedy"][0] != p["top_ids"][-1][0]:
            fail(f"{fam}: first greedy token != argmax at last prompt position for {p['prompt']!r}")
        if not (1 <= len(p["greedy"]) <= 64):
            fail(f"{fam}: greedy length {len(p['greedy'])}")
        eog_pos = [i for i, t in enumerate(p["greedy"]) if t in m["eog_ids"]]
        if eog_pos and eog_pos[0] != len(p["greedy"]) - 1:
            fail(f"{fam}: generation continued past EOG for {p['prompt']!r}")
        n_eog += bool(eog_pos)
        if m["add_bos"] and p["ids"][0] != m["bos"]:
            fail(f"{fam}: prompt ids do not start with BOS")
        if not p["greedy_text"].strip():
            print(f"note: {fam}: empty greedy text for {p['prompt']!r}")
    print(f"{fam}: {len(rows)} strings, {len(doc['prompts'])} prompts, {n_eog} stopped on EOG, {size} bytes")

fams = list(texts_by_family)
for f in fams[1:]:
    if texts_by_family[f] != texts_by_family[fams[0]]:
        fail(f"string list differs between {fams[0]} and {f}")

print("OK" if ok else "FAILED")
sys.exit(0 if ok else 1)
