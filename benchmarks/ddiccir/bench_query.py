"""Per-query B.7 coding time at the realistic size (C=1024, 7x7, k=15, 128/256 atoms, L=15)
and ranking over a 100k index. Usage: OMP_WAIT_POLICY=PASSIVE python bench_query.py [threads]"""
import os, sys, time, statistics
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))
from pipelines.ddiccir import DDicCIRModel, IterationRecord, PipelineConfig, encode_queries, rank_by_code, normalise_rows
threads = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 2
torch.set_num_threads(threads)
g = torch.Generator().manual_seed(0)
C, k, K1, K2 = 1024, 15, 128, 256
config = PipelineConfig()
def relu_maps(n):
    return (torch.randn(n, C, 7, 7, generator=g) - 0.5).clamp_min(0)
layer1 = torch.nn.functional.unfold(relu_maps(k * 3), 3, padding=1).transpose(1, 2).reshape(k, -1, 9 * C)[:, :K1].transpose(1, 2).contiguous()
layer1 = layer1 / torch.linalg.vector_norm(layer1, dim=1, keepdim=True)
layer2 = torch.randn(k * K1, K2, generator=g); layer2 /= torch.linalg.vector_norm(layer2, dim=0)
model = DDicCIRModel(config=config, map_shape=(C, 7, 7), layer1=layer1, layer2=layer2,
                     labels=torch.zeros(1, dtype=torch.long), codes=torch.zeros(1, K2), history=(),
                     converged=False, stop_reason="benchmark")
model.layer1_grams; model.layer2_gram
maps = relu_maps(64).half()
def timed(fn, repeats):
    fn(); out = []
    for _ in range(repeats):
        t = time.perf_counter(); fn(); out.append(time.perf_counter() - t)
    return statistics.median(out)
for b in ([] if "--rank-only" in sys.argv else (1, 8, 32, 64)):
    s = timed(lambda: encode_queries(model, maps[:b], batch_size=b), 5 if b <= 8 else 3)
    print(f"encode_queries threads={threads} batch={b}: {1000 * s / b:.1f} ms per query ({1000 * s:.0f} ms per batch)")
N = 100_000
index = torch.zeros(N, K2)
rows = torch.arange(N)[:, None].expand(N, 15)
index[rows, torch.randint(K2, (N, 15), generator=g)] = torch.randn(N, 15, generator=g)
index_clusters = torch.randint(k, (N,), generator=g)
q, qc = index[:32].clone(), index_clusters[:32].clone()
for b in (1, 32):
    s = timed(lambda: rank_by_code(q[:b], qc[:b], index, index_clusters, 20), 5)
    print(f"rank_by_code N={N} batch={b}: {1000 * s / b:.1f} ms per query")
unit = normalise_rows(index)
for b in (1, 32):
    s = timed(lambda: rank_by_code(q[:b], qc[:b], unit, index_clusters, 20, index_is_normalised=True), 5)
    print(f"rank_by_code N={N} batch={b} normalised index: {1000 * s / b:.1f} ms per query")
