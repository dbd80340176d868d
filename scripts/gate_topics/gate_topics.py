"""How well the topic gate's rule tells a topic from look-alike prompts, on held-out prompts.

The rules are the pipeline's (crates/pipeline/src/gate.rs): a direction from on-topic minus
off-topic train activations at one point, threshold at the midpoint of the two groups' mean
projections, the point chosen by 5-fold held-out balanced accuracy on the train prompts. The
direction is the mean difference (`gate = "md"`, the default) or the ridge mean difference
whitened by the off-topic prompts' covariance (`gate = "rmd"`, lambda = kappa * trace / d with
the config's kappa = 1). Train prompts: 30 on the topic and a fifth of every other group (the
other candidate topic is left out); every other prompt is held out.

    refusal-steer capture --prompts P.jsonl --out A.safetensors     # P from prompts.py
    python3 scripts/gate_topics/gate_topics.py A.safetensors P.jsonl math health
"""
import json, struct, sys
import numpy as np


def load_activations(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        t = header["activations"]
        assert t["dtype"] == "F32", t["dtype"]
        start, end = t["data_offsets"]
        f.seek(8 + n + start)
        return np.frombuffer(f.read(end - start), dtype="<f4").reshape(t["shape"]).astype(np.float64)


def midpoint_rule(x, on, kappa=None):
    v = x[on].mean(0) - x[~on].mean(0)
    if kappa is not None:
        off = x[~on] - x[~on].mean(0)
        cov = off.T @ off / len(off)
        v = np.linalg.solve(cov + kappa * np.trace(cov) / len(cov) * np.eye(len(cov)), v)
    v /= np.linalg.norm(v)
    return v, ((x[on] @ v).mean() + (x[~on] @ v).mean()) / 2


def balanced_accuracy(pred, on):
    return (pred[on].mean() + (~pred[~on]).mean()) / 2


def heldout_accuracy(x, on, kappa, rng, folds=5):
    idx = rng.permutation(len(x))
    pred = np.zeros(len(x), bool)
    for fold in np.array_split(idx, folds):
        keep = np.ones(len(x), bool)
        keep[fold] = False
        v, t = midpoint_rule(x[keep], on[keep], kappa)
        pred[fold] = x[fold] @ v > t
    return balanced_accuracy(pred, on)


def main():
    acts, prompts, topics = sys.argv[1], sys.argv[2], sys.argv[3:]
    a = load_activations(acts)
    groups = np.array([json.loads(line)["set"] for line in open(prompts, encoding="utf-8")])
    assert len(groups) == len(a), "the activations and the prompt file differ in length"
    candidates = {"math", "health"}
    for topic in topics:
        rng = np.random.default_rng(0)
        train = np.zeros(len(a), bool)
        for g in sorted(set(groups)):
            idx = rng.permutation(np.where(groups == g)[0])
            if g == topic:
                train[idx[:30]] = True
            elif g not in candidates:
                train[idx[: max(4, len(idx) // 5)]] = True
        on = groups == topic
        rules = {}
        for name, kappa in [("md", None), ("rmd", 1.0)]:
            scores = [heldout_accuracy(a[train, p], on[train], kappa, np.random.default_rng(p))
                      for p in range(1, a.shape[1])]
            point = 1 + int(np.argmax(scores))
            v, t = midpoint_rule(a[train, point], on[train], kappa)
            rules[f"{name} (point {point}, held-out accuracy {scores[point - 1]:.3f})"] = a[:, point] @ v > t
        held = ~train
        names = sorted(set(groups) - {topic}, key=lambda g: (g in candidates, g))
        print(f"\ntopic {topic}: train {int((train & on).sum())} on, {int((train & ~on).sum())} off; "
              "held-out prompts let through:")
        print("| gate | " + " | ".join([topic] + names) + " |")
        print("|---" * (len(names) + 2) + "|")
        for name, passed in rules.items():
            cells = [f"{int(passed[held & (groups == g)].sum())}/{int((held & (groups == g)).sum())}"
                     for g in [topic] + names]
            print(f"| {name} | " + " | ".join(cells) + " |")


main()
