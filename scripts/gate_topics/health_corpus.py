#!/usr/bin/env python3
"""A gate-eval corpus for the reverse-mode topic of configs/induce.toml: MMLU health questions
(one source per subject, so gate-eval holds each subject out whole) against MMLU questions on
other subjects, harmful requests from three sources (JailbreakBench, AdvBench, XSTest's unsafe
prompts: the ridge gate's cuts hold each harmful source out in turn, so they need two or
more), JailbreakBench benign goals and Alpaca instructions (seed 5).

    python3 scripts/gate_topics/health_corpus.py ../shared/data > /tmp/health.jsonl
    refusal-steer gate-eval --on health --prompts /tmp/health.jsonl --acts /tmp/health-mean.safetensors
    refusal-steer gate-eval --method rmd --on health --prompts /tmp/health.jsonl --acts /tmp/health-last.safetensors
"""
import csv
import json
import random
import sys

DATA = sys.argv[1] if len(sys.argv) > 1 else "../shared/data"
rng = random.Random(5)
HEALTH = ["nutrition", "clinical_knowledge", "college_medicine", "anatomy", "human_aging"]
OTHER = ["high_school_geography", "high_school_world_history", "conceptual_physics", "astronomy",
         "high_school_computer_science", "marketing", "high_school_biology",
         "high_school_psychology", "professional_psychology", "college_biology",
         "high_school_chemistry", "philosophy"]


def emit(set_, source, prompts):
    for i, p in enumerate(prompts):
        print(json.dumps({"id": f"{source}-{i}", "set": set_, "source": source, "lang": "en",
                          "prompt": p}))


mmlu = list(csv.DictReader(open(f"{DATA}/mmlu/mmlu_test_sample1000_seed42.csv", newline="")))
for subject in HEALTH:
    emit("health", subject, [r["question"] for r in mmlu if r["subject"] == subject])
for subject in OTHER:
    emit("other-subject", subject, [r["question"] for r in mmlu if r["subject"] == subject])
jbb = f"{DATA}/jailbreakbench"
emit("harmful", "jbb-harmful", [r["goal"] for r in csv.DictReader(open(f"{jbb}/harmful-behaviors.csv", newline=""))])
emit("benign", "jbb-benign", [r["goal"] for r in csv.DictReader(open(f"{jbb}/benign-behaviors.csv", newline=""))])
alpaca = json.load(open(f"{DATA}/alpaca/alpaca_no_input_sample2000_seed42.json"))
emit("benign", "alpaca", [r["instruction"] for r in rng.sample(alpaca, 100)])
advbench = [r["goal"] for r in csv.DictReader(open(f"{DATA}/advbench/harmful_behaviors.csv", newline=""))]
emit("harmful", "advbench", rng.sample(advbench, 100))
xstest = list(csv.DictReader(open(f"{DATA}/xstest/xstest_prompts.csv", newline="")))
emit("harmful", "xstest-unsafe", [r["prompt"] for r in xstest if r["label"] == "unsafe"])
