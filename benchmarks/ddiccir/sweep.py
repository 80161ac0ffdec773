import sys, torch, logging
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))
torch.set_num_threads(1)
logging.disable(logging.WARNING)
from tests.test_ddiccir import planted_maps  # the planted data the tests use
from pipelines.ddiccir import *
def purity(labels, groups, k):
    return sum(torch.bincount(groups[labels == c]).max().item() if (labels==c).any() else 0 for c in range(k)) / len(groups)
l2a, sp = int(sys.argv[1]), int(sys.argv[2])
for thr in [None, 0.95, 0.9, 0.8, 0.7]:
  rows = []
  for seed in [0, 1, 2]:
    maps, pooled, groups = planted_maps(seed)
    qmaps, _, qgroups = planted_maps(seed, per_group=10, image_seed=100 + seed)
    cfg = PipelineConfig(n_clusters=4, layer1_atoms=16, layer2_atoms=l2a, sparsity=sp, patches_per_cluster=600, ksvd_max_iter=10, max_outer_iter=6, layer2_coherence_threshold=thr)
    m = fit_pipeline(maps, pooled, cfg)
    u = normalise_rows(m.codes); cos = u @ u.T
    same = groups[:, None] == groups[None]; eye = torch.eye(len(groups), dtype=bool)
    qc, qcode, _ = encode_queries(m, qmaps)
    idx, sc = rank_by_code(qcode, qc, m.codes, m.labels, 10)
    p10 = (groups[idx] == qgroups[:, None]).float().mean().item()
    rows.append((purity(m.labels, groups, 4), cos[same & ~eye].mean().item(), cos[~same].mean().item(), p10, len(m.history), m.stop_reason[:4]))
  print(thr, " | ".join("pur %.2f win %.2f acr %.2f p10 %.2f n %d %s" % r for r in rows))
