#!/usr/bin/env python3
"""The prompts of the gate corpus: seeded samples of ../shared/data, the judge corpus's
hand-written prompts, and prompts built from topics.json's topics and templates.

Usage: python3 data/gate/make_prompts.py [SHARED_DATA] > data/gate/prompts.jsonl
Every line: {"id", "set", "source", "phrasing", "lang", "prompt"}. `set` is the class the gate
is measured on: china (on the topic, refused or answered with the official line), contrast
(China questions the models answer), other-country (political, about other countries),
harmful, benign. `source` is what `gate-eval` holds out whole; a templated prompt's source is
`template-<phrasing>` for China and other countries alike, so each phrasing is held out in
both languages and both sets at once. Seed 11, so the
same file comes back.
"""
import csv
import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = Path(sys.argv[1] if len(sys.argv) > 1 else HERE.parents[2] / "shared" / "data")
rng = random.Random(11)
seen = set()


def lines(rel):
    return [l.strip() for l in (DATA / rel).read_text().splitlines() if l.strip()]


def column(rel, field, where=None):
    with open(DATA / rel, newline="") as f:
        rows = list(csv.DictReader(f))
    return [r[field] for r in rows if not where or all(r[k] == v for k, v in where.items())]


def pick(items, k):
    return [items[i] for i in sorted(rng.sample(range(len(items)), min(k, len(items))))]


def lang_of(text):
    return "zh" if any("\u4e00" <= c <= "\u9fff" for c in text) else "en"


def emit(set_, source, prompts, phrasing="source"):
    """One line per prompt not emitted before (a text in two sources counts once)."""
    n = 0
    for p in prompts:
        if p in seen:
            continue
        seen.add(p)
        n += 1
        print(json.dumps({"id": f"{source}-{n:03d}", "set": set_, "source": source,
                          "phrasing": phrasing, "lang": lang_of(p), "prompt": p},
                         ensure_ascii=False))


topics = json.loads((HERE / "topics.json").read_text())
ccp = json.loads((DATA / "ccp_sensitive_prompts/ccp_sensitive_prompts.json").read_text())
alpaca = json.loads((DATA / "alpaca/alpaca_no_input_sample2000_seed42.json").read_text())
handwritten = [json.loads(l) for l in
               (HERE.parent / "labels/prompts/handwritten.jsonl").read_text().splitlines()]

# On the topic, from every source the data has.
emit("china", "deccp", lines("deccp/censored.txt"))
emit("china", "ccp-sensitive", pick([r["prompt"] for r in ccp], 136))
emit("china", "shrimpmoss", pick(lines("shrimpmoss_china/china_bad_english.txt"), 100))
emit("china", "handwritten", [r["prompt"] for r in handwritten if r["set"].startswith("china")])
emit("contrast", "deccp-answered", lines("deccp/uncensored.txt"))
emit("contrast", "shrimpmoss-answered", pick(lines("shrimpmoss_china/china_good_english.txt"), 100))
emit("other-country", "handwritten-other",
     [r["prompt"] for r in handwritten if not r["set"].startswith("china")])
emit("harmful", "jbb-harmful", column("jailbreakbench/harmful-behaviors.csv", "goal"))
emit("harmful", "advbench", pick(column("advbench/harmful_behaviors.csv", "goal"), 150))
emit("harmful", "xstest-unsafe", column("xstest/xstest_prompts.csv", "prompt", {"label": "unsafe"}))
emit("harmful", "harmful-zh", [r["zh"] for r in topics["harmful_zh"]])
emit("benign", "jbb-benign", column("jailbreakbench/benign-behaviors.csv", "goal"))
emit("benign", "alpaca", pick([r["instruction"] for r in alpaca], 150))
emit("benign", "xstest-safe", column("xstest/xstest_prompts.csv", "prompt", {"label": "safe"}))
emit("benign", "benign-zh", [r["zh"] for r in topics["benign_zh"]])

# Every topic in every phrasing and both languages, one template drawn per (topic, phrasing,
# language), from a generator seeded by the set, phrasing and language, so that adding a
# phrasing leaves the others' prompts as they were.
for set_, key in (("china", "china"), ("other-country", "other_country")):
    for phrasing, by_lang in topics["templates"].items():
        for lang in ("en", "zh"):
            draw = random.Random(f"11-{set_}-{phrasing}-{lang}")
            prompts = [draw.choice(by_lang[lang]).replace("{topic}", t[lang]) for t in topics[key]]
            prefix = "template" if set_ == "china" else "template-other"
            for n, p in enumerate(prompts, 1):
                seen.add(p)
                print(json.dumps({"id": f"{prefix}-{phrasing}-{lang}-{n:03d}", "set": set_,
                                  "source": f"template-{phrasing}",
                                  "phrasing": phrasing, "lang": lang, "prompt": p},
                                 ensure_ascii=False))
