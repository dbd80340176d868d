"""Other read-outs of the probe judge's features, cross-validated on the labelled corpus.

`refusal-steer calibrate --features DIR` keeps the reader's residual features of every
labelled answer (points 1.. at the last token, then the same points averaged over the answer).
This script reads them and compares, by out-of-fold predictions over 5 folds grouped by
prompt: the ridge read-out at one point (what `calibrate` fits), several points and both
poolings side by side, and two scikit-learn classifiers (logistic regression, a one-hidden-
layer MLP) on the features' first 256 principal components. The cut of each is the one that
maximises kappa on the pooled out-of-fold scores, the same for every row (optimistic, but
alike for all), without the language and degeneracy checks that run before the probe.

    pip install numpy scikit-learn safetensors
    python3 scripts/judge_cv/readouts.py FEATURES_DIR [data/labels/answers]
"""

import glob
import json
import struct
import sys

import numpy as np
from safetensors.numpy import load_file
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPClassifier
from sklearn.preprocessing import StandardScaler

FOLDS = 5


def load(features_dir, labels_dir):
    feats = {}
    for path in sorted(glob.glob(f"{features_dir}/*.safetensors")):
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            ids = json.loads(json.loads(f.read(n))["__metadata__"]["ids"])
        acts = load_file(path)["activations"]
        feats.update(zip(ids, acts))
    items = []
    for path in sorted(glob.glob(f"{labels_dir}/*.jsonl")):
        for line in open(path):
            r = json.loads(line)
            key = f"{r['model']}/{r['id']}/{r['condition']}/{r['sample']}"
            if key in feats:
                items.append((feats[key], r))
    x = np.stack([f for f, _ in items]).astype(np.float32)
    labels = [r["label"] for _, r in items]
    prompts = [r["prompt"] for _, r in items]
    return x, labels, prompts


def kappa(truth, said):
    agree = (truth == said).mean()
    chance = truth.mean() * said.mean() + (1 - truth.mean()) * (1 - said.mean())
    return (agree - chance) / (1 - chance)


def auc(truth, scores):
    order = np.argsort(scores)
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    pos = truth.sum()
    return (ranks[truth == 1].sum() - pos * (pos + 1) / 2) / (pos * (len(truth) - pos))


def ridge_scores(x, y, fold, kappa_rel=1.0):
    """Out-of-fold scores of the ridge on ±1 targets, solved in the dual as `calibrate` does."""
    scores = np.zeros(len(y))
    for k in range(FOLDS):
        train, test = fold != k, fold == k
        mean = x[train].mean(0)
        xt, xe = x[train] - mean, x[test] - mean
        gram = xt @ xt.T
        lam = kappa_rel * np.trace(gram) / x.shape[1]
        bias = 2 * y[train].mean() - 1
        alpha = np.linalg.solve(gram + lam * np.eye(len(gram)), 2 * y[train] - 1 - bias)
        scores[test] = xe @ (xt.T @ alpha) + bias
    return scores


def sklearn_scores(x, y, fold, make):
    scores = np.zeros(len(y))
    for k in range(FOLDS):
        train, test = fold != k, fold == k
        scaler = StandardScaler().fit(x[train])
        pca = PCA(256, random_state=0).fit(scaler.transform(x[train]))
        a = pca.transform(scaler.transform(x[train]))
        b = pca.transform(scaler.transform(x[test]))
        scores[test] = make().fit(a, y[train]).predict_proba(b)[:, 1]
    return scores


def main():
    features_dir = sys.argv[1]
    labels_dir = sys.argv[2] if len(sys.argv) > 2 else "data/labels/answers"
    feats, labels, prompts = load(features_dir, labels_dir)
    n, slots, _ = feats.shape
    points = slots // 2
    y = np.array([0.0 if l == "answer" else 1.0 for l in labels])
    groups = sorted(set(prompts))
    np.random.default_rng(7).shuffle(groups)
    fold_of = {g: i % FOLDS for i, g in enumerate(groups)}
    fold = np.array([fold_of[p] for p in prompts])
    last = lambda p: p - 1
    mean = lambda p: points + p - 1
    cols = lambda slots_: feats[:, slots_, :].reshape(n, -1)

    print(f"{n} answers, {len(groups)} prompts, {points} points")
    print("| read-out | kappa | false refusals | AUC | deflection recall |")
    print("|---|---|---|---|---|")

    def row(name, scores):
        cuts = np.quantile(scores, np.linspace(0.02, 0.98, 97))
        best = max(cuts, key=lambda c: kappa(y, (scores > c).astype(float)))
        said = scores > best
        deflections = np.array([l == "deflection" for l in labels])
        print(
            f"| {name} | {kappa(y, said.astype(float)):.3f} | {said[y == 0].mean():.3f} "
            f"| {auc(y, scores):.3f} | {said[deflections].mean():.2f} |",
            flush=True,
        )

    for p in (17, 19, 21):
        row(f"ridge, mean, point {p}", ridge_scores(cols([mean(p)]), y, fold))
    row("ridge, last token, point 19", ridge_scores(cols([last(19)]), y, fold))
    row("ridge, mean and last, point 19", ridge_scores(cols([mean(19), last(19)]), y, fold))
    row("ridge, mean, points 15, 19, 23", ridge_scores(cols([mean(p) for p in (15, 19, 23)]), y, fold))
    odd = [mean(p) for p in range(13, 26, 2)]
    row("ridge, mean, points 13-25 odd", ridge_scores(cols(odd), y, fold))
    both = [f(p) for f in (mean, last) for p in (15, 19, 23)]
    row("ridge, mean and last, points 15, 19, 23", ridge_scores(cols(both), y, fold))
    x19 = cols([mean(19)])
    for c in (0.01, 0.1):
        make = lambda: LogisticRegression(C=c, max_iter=2000, class_weight="balanced")
        row(f"logistic, C {c}, mean, point 19", sklearn_scores(x19, y, fold, make))
    for alpha in (1.0, 10.0):
        make = lambda: MLPClassifier((64,), alpha=alpha, max_iter=500, random_state=0)
        row(f"MLP 64, alpha {alpha}, mean, point 19", sklearn_scores(x19, y, fold, make))


if __name__ == "__main__":
    main()
