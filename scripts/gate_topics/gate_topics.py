"""How well the topic gate's rule tells a topic from look-alike prompts, on held-out prompts.

The rule is the pipeline's (crates/pipeline/src/gate.rs): the mean difference of on-topic minus
off-topic train activations at one point, threshold at the midpoint of the two groups' mean
projections, the point chosen by 5-fold held-out balanced accuracy on the train prompts. Train
prompts: 30 on the topic and a fifth of every other group (the other candidate topic is left
out); every other prompt is held out. Ridge LDA on standardised activations at the same point
is printed beside it, as the strongest other linear rule tried.

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


def midpoint_rule(x, on):
    v = x[on].mean(0) - x[~on].mean(0)
    v /= np.linalg.norm(v)
    return v, ((x[on] @ v).mean() + (x[~on] @ v).mean()) / 2


def balanced_accuracy(pred, on):
    return (pred[on].mean() + (~pred[~on]).mean()) / 2


def heldout_accuracy(x, on, rng, folds=5):
    idx = rng.permutation(len(x))
    pred = np.zeros(len(x), bool)
    for fold in np.array_split(idx, folds):
        keep = np.ones(len(x), bool)
        keep[fold] = False
        v, t = midpoint_rule(x[keep], on[keep])
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
        scores = [heldout_accuracy(a[train, p], on[train], np.random.default_rng(p))
                  for p in range(1, a.shape[1])]
        point = 1 + int(np.argmax(scores))
        x = a[:, point]
        v, t = midpoint_rule(x[train], on[train])
        mu, sd = x[train].mean(0), x[train].std(0) + 1e-6
        z = (x - mu) / sd
        z1, z0 = z[train & on], z[train & ~on]
        within = np.cov(np.vstack([z1 - z1.mean(0), z0 - z0.mean(0)]).T)
        w = np.linalg.solve(within + np.eye(len(within)), z1.mean(0) - z0.mean(0))
        rules = {"gate (midpoint)": x @ v > t,
                 "ridge LDA": z @ w > ((z1 @ w).mean() + (z0 @ w).mean()) / 2}
        held = ~train
        names = sorted(set(groups) - {topic}, key=lambda g: (g in candidates, g))
        print(f"\ntopic {topic}: point {point} (held-out balanced accuracy on train {scores[point - 1]:.3f}); "
              f"train {int((train & on).sum())} on, {int((train & ~on).sum())} off; held-out prompts let through:")
        print("| rule | " + " | ".join([topic] + names) + " |")
        print("|---" * (len(names) + 2) + "|")
        for name, passed in rules.items():
            cells = [f"{int(passed[held & (groups == g)].sum())}/{int((held & (groups == g)).sum())}"
                     for g in [topic] + names]
            print(f"| {name} | " + " | ".join(cells) + " |")


main()
