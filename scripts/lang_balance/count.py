#!/usr/bin/env python3
"""Per answers file: English prompts answered in Chinese or mixed (a quarter or more of the
letters Han, one Han character weighing three Latin letters, as the judge's language check)."""
import json, re, sys

han = re.compile(r"[\u4e00-\u9fff]")
def han_share(text):
    h, l = 3 * len(han.findall(text)), len(re.findall(r"[A-Za-z]", text))
    return h / (h + l) if h + l else 0.0
for path in sys.argv[1:]:
    rows = [json.loads(l) for l in open(path)]
    english = [r for r in rows if not han.search(r["prompt"])]
    switched = sum(han_share(r["answer"]) >= 0.25 for r in english)
    print(f"{path}: {switched}/{len(english)} English prompts answered in Chinese or mixed")
