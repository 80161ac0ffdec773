"""Realistic-dimension fit (C=1024, 7x7, k=15, 128/256 atoms, L=15) on random post-ReLU-like maps.
Usage: OMP_WAIT_POLICY=PASSIVE python bench_fit.py N_IMAGES MAX_OUTER KSVD_ITER"""
import os, sys, time, logging
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))
torch.set_num_threads(2)
logging.basicConfig(level=logging.INFO, format="%(relativeCreated)8.0f ms %(message)s")
logging.getLogger("pipelines.dictionary_learning").setLevel(logging.ERROR)
from pipelines.ddiccir import PipelineConfig, fit_pipeline, encode_queries
n, outer, sweeps = map(int, sys.argv[1:4])
g = torch.Generator().manual_seed(0)
# 15 groups: a group-specific channel profile times spatial noise, post-ReLU, float16 as stored
profiles = (torch.randn(15, 1024, 1, 1, generator=g)).clamp_min(0)
groups = torch.arange(n) % 15
maps = ((profiles[groups] * torch.rand(n, 1, 7, 7, generator=g) * 2 + torch.randn(n, 1024, 7, 7, generator=g) * 0.5) - 0.3).clamp_min(0).half()
pooled = maps.float().mean(dim=(2, 3))
config = PipelineConfig(max_outer_iter=outer, ksvd_max_iter=sweeps)
t = time.perf_counter()
model = fit_pipeline(maps, pooled, config)
print(f"fit {n} images: {time.perf_counter() - t:.1f} s, stop {model.stop_reason}")
for r in model.history:
    print(r.iteration, {k: round(v, 1) for k, v in r.seconds.items()}, "sizes", r.cluster_sizes,
          "l1 coherence max %.3f" % max(r.layer1_coherence), "l1 err %.3f" % max(e for e in r.layer1_error if e is not None),
          "l2 err %.3f coh %.3f replaced %s" % (r.layer2_error, r.layer2_coherence, r.layer2_replaced_atoms), "label change", r.label_change,
          "l1 change", None if r.layer1_change[0] is None else round(max(r.layer1_change), 3), "l2 change", r.layer2_change)
purity = sum(int(torch.bincount(groups[model.labels == c]).max()) for c in model.labels.unique()) / n
print("purity vs the 15 planted profiles", purity)
c, codes, err = encode_queries(model, maps[:64])
print("query cluster agreement (first 64)", float((c == model.labels[:64]).float().mean()))
