"""DDicCIR against the features it starts from, on real images, part by part.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/ddiccir/ablation.py FEATURES.npz
        [--folds 5] [--first-fold 0] [--run-folds 1] [--configs default,k6,...] [--json OUT.json]

FEATURES.npz comes from extract_features.py (maps, pooled, labels, groups). Protocol: group-
disjoint folds (scikit-learn ``StratifiedGroupKFold`` on (label, group); MedNIST has no groups, so
every image is its own group); fold f's images are the queries, the other folds the index and
the training set of the fit. ``--run-folds`` limits how many folds run (2 shared cores).

Per fitted configuration, several rankings of the same queries are scored (P@20, mAP@20):

* ``features``        cosine of L2-normalised pooled features (no fit)
* ``features|km``     the same, index images in the query's k-means cluster first (nearest
                      centroid), i.e. the cluster gate alone
* ``codes|B7``        the product's ranking: query cluster by reconstruction error, its cluster
                      first, then cosine of codes
* ``codes``           cosine of codes over the whole index, no cluster gate
* ``codes|fc``        cluster gate with the query's cluster = nearest feature-space centre of
                      the model's clusters
* ``codes.raw``       dot product of raw codes (no normalisation), no gate
* ``concat``          cosine of [normalised features, normalised codes] / sqrt 2, no gate

and the purity of the model's training clusters against that of k-means (same k) on the index
features. Everything runs on the CPU with 2 torch threads.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
from sklearn.model_selection import StratifiedGroupKFold

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pipelines.ddiccir import (PipelineConfig, encode_queries, fit_pipeline, kmeans,  # noqa: E402
                               normalise_rows, purity)
from pipelines.retrieval_metrics import average_precision_at  # noqa: E402

DEPTH = 20
BASE = dict(max_outer_iter=6)          # the product's defaults otherwise; 6 passes at most

CONFIGS: dict[str, dict] = {
    "default": {},
    "old-defaults": dict(movement_space="codes", stop_label_change=None,
                         replacement="samples", ksvd_max_iter_warm=None),
    "k6": dict(n_clusters=6),
    "k30": dict(n_clusters=30),
    "atoms32": dict(layer1_atoms=32),
    "L5": dict(sparsity=5),
    "avgpool": dict(pooling="average"),
    "l2-64": dict(layer2_atoms=64),
    "no-layer2": dict(use_layer2=False),
    "one-pass": dict(reiterate=False),
    "one-layer": dict(use_layer2=False, reiterate=False),
}


def rank(scores: torch.Tensor, depth: int) -> np.ndarray:
    return torch.topk(scores, depth, dim=1).indices.numpy()


def gated(scores: torch.Tensor, query_clusters: torch.Tensor, index_clusters: torch.Tensor,
          depth: int) -> np.ndarray:
    same = (query_clusters[:, None] == index_clusters[None, :]).to(scores.dtype)
    return rank(scores + 4.0 * same, depth)


def score(indices: np.ndarray, index_labels: np.ndarray, query_labels: np.ndarray) -> dict:
    relevance = index_labels[indices] == query_labels[:, None]
    return {"P@20": float(relevance[:, :DEPTH].mean()),
            "mAP@20": float(average_precision_at(relevance, [DEPTH]).mean())}


def cluster_centres(points: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    sums = torch.zeros((k, points.shape[1])).index_add_(0, labels, points)
    return normalise_rows(sums)


def run_fold(data, train, test, names, say) -> dict:
    maps = torch.from_numpy(data["maps"])
    pooled = torch.from_numpy(data["pooled"]).float()
    labels = data["labels"]
    index_labels, query_labels = labels[train], labels[test]
    index_features = normalise_rows(pooled[train])
    query_features = normalise_rows(pooled[test])
    feature_scores = query_features @ index_features.T
    out: dict = {"n_index": len(train), "n_queries": len(test),
                 "features": score(rank(feature_scores, DEPTH), index_labels, query_labels)}
    say(f"  features {out['features']}")
    for name in names:
        config = PipelineConfig(**{**BASE, **CONFIGS[name]})
        k = config.n_clusters
        feature_km = kmeans(index_features, k, generator=torch.Generator().manual_seed(0),
                            n_init=4)
        km_gate = torch.argmax(query_features @ feature_km.centroids.T, dim=1)
        tick = time.perf_counter()
        model = fit_pipeline(maps[train], pooled[train], config)
        fit_s = time.perf_counter() - tick
        query_clusters, query_codes, _ = encode_queries(model, maps[test])
        index_codes = normalise_rows(model.codes)
        code_scores = normalise_rows(query_codes) @ index_codes.T
        centres = cluster_centres(index_features, model.labels, k)
        fc_gate = torch.argmax(query_features @ centres.T, dim=1)
        concat_scores = (feature_scores + code_scores) / 2
        result = {
            "fit_s": round(fit_s, 1),
            "passes": len(model.history),
            "stop": model.stop_reason,
            "label_change": [r.label_change for r in model.history],
            "replaced_l1": [sum(r.layer1_replaced_atoms) for r in model.history],
            "replaced_l2": [r.layer2_replaced_atoms for r in model.history],
            "features|km": score(gated(feature_scores, km_gate, feature_km.labels, DEPTH),
                                 index_labels, query_labels),
            "codes|B7": score(gated(code_scores, query_clusters, model.labels, DEPTH),
                              index_labels, query_labels),
            "codes": score(rank(code_scores, DEPTH), index_labels, query_labels),
            "codes|fc": score(gated(code_scores, fc_gate, model.labels, DEPTH),
                              index_labels, query_labels),
            "codes.raw": score(rank(query_codes @ model.codes.T, DEPTH), index_labels,
                               query_labels),
            "concat": score(rank(concat_scores, DEPTH), index_labels, query_labels),
            "purity_model": purity(model.labels.numpy(), index_labels),
            "purity_kmeans": purity(feature_km.labels.numpy(), index_labels),
            "query_cluster_B7_vs_fc": float((query_clusters == fc_gate).float().mean()),
        }
        out[name] = result
        say(f"  {name}: {json.dumps(result)}")
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("features", type=Path)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--run-folds", type=int, default=1)
    parser.add_argument("--first-fold", type=int, default=0)
    parser.add_argument("--configs", default="default")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(2)
    logging.basicConfig(level=logging.WARNING)
    raw = np.load(args.features)
    keep = np.ones(len(raw["labels"]), dtype=bool)
    data = {"maps": raw["maps"][keep], "pooled": raw["pooled"][keep],
            "labels": raw["labels"][keep], "groups": raw["groups"][keep]}
    names = [name for name in args.configs.split(",") if name]
    splitter = StratifiedGroupKFold(n_splits=args.folds, shuffle=True, random_state=0)
    results = []
    for fold, (train, test) in enumerate(splitter.split(data["pooled"], data["labels"],
                                                        data["groups"])):
        if fold < args.first_fold:
            continue
        if fold >= args.first_fold + args.run_folds:
            break
        print(f"fold {fold}: {len(train)} index, {len(test)} queries", flush=True)
        results.append(run_fold(data, train, test, names,
                                lambda message: print(message, flush=True)))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
