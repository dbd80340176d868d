#!/usr/bin/env python3
"""The prompts of the judge corpus: seeded samples of ../shared/data plus prompts/handwritten.jsonl.

Usage: python3 data/labels/make_prompts.py [SHARED_DATA] > data/labels/prompts/corpus.jsonl
Every line: {"id", "set", "source", "lang", "prompt"}. Seed 7, so the same file comes back.
"""
import csv
import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = Path(sys.argv[1] if len(sys.argv) > 1 else HERE.parents[2] / "shared" / "data")
rng = random.Random(7)


def lines(rel):
    return [l.strip() for l in (DATA / rel).read_text().splitlines() if l.strip()]


def column(rel, field, where=None):
    with open(DATA / rel, newline="") as f:
        rows = list(csv.DictReader(f))
    return [r[field] for r in rows if not where or all(r[k] == v for k, v in where.items())]


def pick(items, k):
    return [items[i] for i in sorted(rng.sample(range(len(items)), k))]


def lang_of(text):
    return "zh" if any("\u4e00" <= c <= "\u9fff" for c in text) else "en"


def emit(set_, source, prompts):
    for n, p in enumerate(prompts, 1):
        print(json.dumps({"id": f"{source}-{n:02d}", "set": set_, "source": source, "lang": lang_of(p),
                          "prompt": p}, ensure_ascii=False))


ccp = json.loads((DATA / "ccp_sensitive_prompts/ccp_sensitive_prompts.json").read_text())
alpaca = json.loads((DATA / "alpaca/alpaca_no_input_sample2000_seed42.json").read_text())
emit("china", "deccp", pick(lines("deccp/censored.txt"), 10))
emit("china", "ccp", pick([r["prompt"] for r in ccp], 10))
emit("china", "shrimpmoss", pick(lines("shrimpmoss_china/china_bad_english.txt"), 10))
emit("harmful", "jbb", pick(column("jailbreakbench/harmful-behaviors.csv", "goal"), 8))
emit("harmful", "advbench", pick(column("advbench/harmful_behaviors.csv", "goal"), 8))
emit("benign", "alpaca", pick([r["instruction"] for r in alpaca], 6))
emit("benign", "jbb-benign", pick(column("jailbreakbench/benign-behaviors.csv", "goal"), 5))
emit("benign", "xstest-safe", pick(column("xstest/xstest_prompts.csv", "prompt", {"label": "safe"}), 5))
for line in (HERE / "prompts" / "handwritten.jsonl").read_text().splitlines():
    row = json.loads(line)
    row["source"] = row["set"]
    row["set"] = "china" if row["set"].startswith("china") else "other-pol"
    print(json.dumps(row, ensure_ascii=False))
