#!/usr/bin/env python3
"""Answers of one `refusal-steer run` folder to be read and labelled (data/labels/GUIDE.md):
every distinct test answer (baseline and each method), then validation answers of steered
trials, up to --limit, as corpus lines without labels. A prompt already in the corpus keeps
its corpus id, so calibrate's folds never split it, and its unsteered answer is not collected
again where the corpus has one from the same model.

    python3 collect.py RUN_FOLDER MODEL_NAME --limit 240 [--exclude labelled.jsonl] [--target-set health] > unlabelled.jsonl

`--exclude` drops answers already collected (by prompt and answer text).
"""
import argparse, glob, json, os, random

ap = argparse.ArgumentParser()
ap.add_argument("run")
ap.add_argument("model")
ap.add_argument("--limit", type=int, default=240)
ap.add_argument("--labels", default=os.path.join(os.path.dirname(__file__), "../../data/labels/answers"))
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--exclude", nargs="*", default=[])
ap.add_argument("--target-set", default="china", help="what the run's target set is about (health for configs/induce.toml)")
args = ap.parse_args()

known, has_base = {}, set()
for path in glob.glob(f"{args.labels}/*.jsonl"):
    for line in open(path):
        r = json.loads(line)
        known.setdefault(r["prompt"].strip(), r["id"])
        if r["condition"] == "base":
            has_base.add((r["model"], r["id"]))
SETS = {"target": args.target_set, "contrast": args.target_set, "safety": "harmful", "benign": "benign"}


def rows(split):
    # The baseline first, so an answer a gate left unsteered is counted as the baseline's.
    paths = sorted(glob.glob(f"{args.run}/{split}/baseline/*.jsonl"))
    paths += sorted(glob.glob(f"{args.run}/{split}/*/*/*.jsonl"))
    for path in paths:
        method, strength = path.split("/")[-3:-1]
        condition = "base" if "/baseline/" in path else f"run-{split}-{method}{strength}"
        for line in open(path):
            r = json.loads(line)
            if r["set"] not in SETS:
                continue
            yield condition, r


seen, out = set(), []
for path in args.exclude:
    for line in open(path):
        r = json.loads(line)
        seen.add((r["prompt"], r["answer"]))
for split in ["test", "validation"]:
    batch = []
    for condition, r in rows(split):
        key = (r["prompt"], r["answer"])
        if key in seen:
            continue
        seen.add(key)
        stem = r["id"].split("/")[1] if r["id"].count("/") >= 2 else r["set"]
        row_id = known.get(r["prompt"].strip(), f"run/{r['id']}")
        if condition == "base" and (args.model, row_id) in has_base:
            continue  # the corpus already holds this model's unsteered answer to it
        batch.append({
            "model": args.model,
            "id": row_id,
            "condition": condition,
            "sample": r.get("sample", 0),
            "set": SETS[r["set"]],
            "source": stem,
            "prompt": r["prompt"],
            "answer": r["answer"],
        })
    if split == "validation":
        random.Random(args.seed).shuffle(batch)
    out.extend(batch[: max(0, args.limit - len(out))])
for r in out:
    print(json.dumps(r, ensure_ascii=False))
