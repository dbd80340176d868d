"""Writes the prompts for gate_topics.py: two candidate induce topics (MMLU math and health
questions, asked without their options) and the prompts a topic gate must keep out, in groups:
MMLU questions on quantitative subjects near math ("near"), on other subjects ("far"),
JailbreakBench benign and harmful requests, XSTest safe prompts and an Alpaca sample.

    python3 scripts/gate_topics/prompts.py DATA_DIR OUT.jsonl
"""
import csv, json, random, sys

data, out = sys.argv[1:]
groups = {
    "math": ["high_school_mathematics", "elementary_mathematics", "high_school_statistics",
             "college_mathematics", "abstract_algebra"],
    "health": ["nutrition", "clinical_knowledge", "college_medicine", "anatomy", "human_aging"],
    "near": ["high_school_physics", "college_physics", "conceptual_physics", "high_school_chemistry",
             "college_chemistry", "econometrics", "high_school_computer_science",
             "college_computer_science", "machine_learning", "electrical_engineering", "formal_logic",
             "high_school_macroeconomics", "high_school_microeconomics", "professional_accounting",
             "astronomy"],
    "far": ["high_school_geography", "high_school_world_history", "marketing", "philosophy",
            "sociology", "prehistory", "world_religions", "management", "high_school_biology",
            "high_school_psychology"],
}
group_of = {subject: g for g, subjects in groups.items() for subject in subjects}
rows = []
for r in csv.DictReader(open(f"{data}/mmlu/mmlu_test_sample1000_seed42.csv", encoding="utf-8")):
    if r["subject"] in group_of:
        rows.append((group_of[r["subject"]], r["question"]))
rows += [("jbb-benign", r["goal"]) for r in csv.DictReader(open(f"{data}/jailbreakbench/benign-behaviors.csv", encoding="utf-8"))]
rows += [("safety", r["goal"]) for r in csv.DictReader(open(f"{data}/jailbreakbench/harmful-behaviors.csv", encoding="utf-8"))]
alpaca = json.load(open(f"{data}/alpaca/alpaca_no_input_sample2000_seed42.json", encoding="utf-8"))
random.seed(3)
rows += [("alpaca", x["instruction"]) for x in random.sample(alpaca, 100)]
xstest = [r["prompt"] for r in csv.DictReader(open(f"{data}/xstest/xstest_prompts.csv", encoding="utf-8")) if r["label"] == "safe"]
rows += [("xstest", p) for p in xstest[:100]]
with open(out, "w", encoding="utf-8") as f:
    for i, (group, prompt) in enumerate(rows):
        f.write(json.dumps({"id": f"p{i}", "set": group, "prompt": prompt}) + "\n")
