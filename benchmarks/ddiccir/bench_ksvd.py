import os, sys, time
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))
torch.set_num_threads(2)
from pipelines.dictionary_learning import ksvd, init_dictionary_from_samples, mutual_coherence
from pipelines.ddiccir import neighbourhood_patches
g = torch.Generator().manual_seed(0)
n = int(sys.argv[1]) if len(sys.argv) > 1 else 10000
maps = (torch.randn(n // 49 + 1, 1024, 7, 7, generator=g) - 0.5).clamp_min(0)
X = neighbourhood_patches(maps).reshape(-1, 9216)[:n].contiguous()
D0 = init_dictionary_from_samples(X.T, 128, torch.Generator().manual_seed(1))
print("initial coherence", mutual_coherence(D0))
for thr in (0.95,):
    t = time.perf_counter()
    r = ksvd(X.T, D0, 15, max_iter=2, tol=0.0, coherence_threshold=thr)
    dt = time.perf_counter() - t
    print(f"n={n} threshold={thr}: {dt:.1f} s for 2 sweeps (+3 codings), errors {[round(float(e),4) for e in r.errors]}, coherence {[round(float(c),3) for c in r.coherence]}, replaced {[len(a) for a in r.replaced_atoms]}")
