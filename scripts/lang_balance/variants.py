#!/usr/bin/env python3
"""Variants of a run's recommended WRMD recipe, for the language-confound check: the WRMD
vectors refitted as the run fitted them (`orig`, checked against the run's file), on classes
balanced by prompt language (`balanced`), with the within-class language direction projected
out (`projected`), and a random direction (`random`, a control). Each adds the same norm per
point as the recipe. Needs numpy and safetensors (pip).

    python3 variants.py RUN_FOLDER OUT_DIR
"""
import json, re, sys
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

run, out = sys.argv[1], sys.argv[2]
han = re.compile(r"[\u4e00-\u9fff]")
def chinese(text):
    return 3 * len(han.findall(text)) > len(re.findall(r"[A-Za-z]", text))

acts = safe_open(f"{run}/train-acts.safetensors", "np")
A = acts.get_tensor("activations").astype(np.float64)
ids, sets = json.loads(acts.metadata()["ids"]), json.loads(acts.metadata()["sets"])
prompt = {json.loads(l)["id"]: json.loads(l)["prompt"] for l in open(f"{run}/train-answers.jsonl")}
score = {json.loads(l)["id"]: json.loads(l)["c"] for l in open(f"{run}/train-scores.jsonl")}
rows = [i for i, s in enumerate(sets) if s in ("target", "contrast") and abs(score[ids[i]]) > 0.5]
c = np.array([score[ids[i]] for i in rows])
R, C = c > 0, c < 0
zh = np.array([chinese(prompt[ids[i]]) for i in rows])

def balanced(w):
    """Each language gets the mean of its two classes' shares of the weight in both classes."""
    share = {k: np.array([w[m & (zh == z)].sum() / w[m].sum() for z in (False, True)]) for k, m in (("R", R), ("C", C))}
    target = (share["R"] + share["C"]) / 2
    f = np.ones_like(w)
    for k, m in (("R", R), ("C", C)):
        for j, z in enumerate((False, True)):
            f[m & (zh == z)] = target[j] / share[k][j]
    return w * f

def wrmd(x, w):
    mr = (w[R, None] * x[R]).sum(0) / w[R].sum()
    mc = (w[C, None] * x[C]).sum(0) / w[C].sum()
    z = np.sqrt(w[C, None] / w[C].sum()) * (x[C] - mc)
    cov = z.T @ z
    return np.linalg.solve(cov + np.trace(cov) / x.shape[1] * np.eye(x.shape[1]), mr - mc)

recipe = safe_open(f"{run}/recommended.steer.safetensors", "np")
meta = recipe.metadata()
tensors = {k: recipe.get_tensor(k) for k in recipe.keys()}
points = json.loads(meta["recipe"])["add_points"]
fitted = safe_open(f"{run}/vectors/wrmd.safetensors", "np").get_tensor("vectors")
w = np.abs(c)
rng = np.random.default_rng(0)
variants = {name: [] for name in ("orig", "balanced", "projected", "random")}
for p in points:
    x = A[rows, p, :]
    v = wrmd(x, w)
    cos = v @ fitted[p] / np.linalg.norm(v) / np.linalg.norm(fitted[p])
    assert cos > 0.9999, f"point {p}: the refit differs from the run's vector (cosine {cos})"
    lang = (x[R & zh].mean(0) - x[R & ~zh].mean(0) + x[C & zh].mean(0) - x[C & ~zh].mean(0)) / 2
    u = lang / np.linalg.norm(lang)
    variants["orig"].append(v)
    variants["balanced"].append(wrmd(x, balanced(w)))
    variants["projected"].append(v - (v @ u) * u)
    variants["random"].append(rng.standard_normal(v.shape))
added = np.linalg.norm(tensors["add"], axis=1) * np.abs(tensors["add_strengths"])
for name, vs in variants.items():
    add = np.stack(vs).astype(np.float32)
    t = dict(tensors, add=add, add_strengths=(np.sign(tensors["add_strengths"]) * added / np.linalg.norm(add, axis=1)).astype(np.float32))
    save_file(t, f"{out}/{name}.steer.safetensors", metadata=meta)
print(f"{R.sum()} refused ({zh[R].mean():.0%} Chinese), {C.sum()} answered ({zh[C].mean():.0%} Chinese)")
