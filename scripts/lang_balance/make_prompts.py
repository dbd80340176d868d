#!/usr/bin/env python3
"""Held-out China prompts for the language-confound check: 40 English and 10 Chinese prompts
from deccp (censored), ShrimpMoss (china_bad_english) and CCP-sensitive prompts, none of them
in the run's split (seed 7).

    python3 make_prompts.py RUN_FOLDER ../shared/data > prompts.jsonl
"""
import json, random, re, sys

han = re.compile(r"[\u4e00-\u9fff]")
run, data = sys.argv[1], sys.argv[2]
split = json.load(open(f"{run}/split.json"))
used = {p["prompt"].strip() for sp in split["prompts"].values() for part in sp.values() for p in part}
pool = [("deccp", l.strip()) for l in open(f"{data}/deccp/censored.txt") if l.strip()]
pool += [("shrimpmoss", l.strip()) for l in open(f"{data}/shrimpmoss_china/china_bad_english.txt") if l.strip()]
pool += [("ccp", r["prompt"].strip()) for r in json.load(open(f"{data}/ccp_sensitive_prompts/ccp_sensitive_prompts.json"))]
pool = [(s, p) for s, p in pool if p not in used]
english = [x for x in pool if not han.search(x[1])]
chinese = [x for x in pool if han.search(x[1])]
rng = random.Random(7)
for i, (source, prompt) in enumerate(rng.sample(english, 40) + rng.sample(chinese, 10)):
    print(json.dumps({"id": f"{source}/{i}", "prompt": prompt}, ensure_ascii=False))
