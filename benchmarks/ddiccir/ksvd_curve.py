"""K-SVD error per sweep on one cluster's real patches: how many sweeps the fit needs.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/ddiccir/ksvd_curve.py FEATURES.npz [N_IMAGES]
        [N_PATCHES] [SWEEPS]

Takes the first k-means cluster (k = 15, normalised pooled features) of FEATURES.npz
(extract_features.py), samples N_PATCHES of its 3 x 3 x 1024 patches and runs K-SVD with the
pipeline's layer-1 settings (128 atoms, sparsity 15, coherence 0.95) cold, then warm once more,
printing the relative error after every sweep and the seconds per sweep.
"""
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from pipelines.ddiccir import PipelineConfig, _generator, _sample_cluster_patches, kmeans, normalise_rows  # noqa: E402
from pipelines.dictionary_learning import init_dictionary_from_samples, ksvd  # noqa: E402

torch.set_num_threads(2)
data = np.load(sys.argv[1])
n_images = int(sys.argv[2]) if len(sys.argv) > 2 else 960
n_patches = int(sys.argv[3]) if len(sys.argv) > 3 else 4000
sweeps = int(sys.argv[4]) if len(sys.argv) > 4 else 10
maps = torch.from_numpy(data["maps"][:n_images])
pooled = normalise_rows(torch.from_numpy(data["pooled"][:n_images]).float())
labels = kmeans(pooled, 15, generator=torch.Generator().manual_seed(0), n_init=2).labels
members = torch.nonzero(labels == 0).squeeze(1)
config = PipelineConfig()
samples = _sample_cluster_patches(maps, members, n_patches, _generator(0, 2, 1, 0), config)
print(f"cluster 0: {members.numel()} images, {samples.shape[0]} patches")
initial = init_dictionary_from_samples(samples.T, 128, _generator(0, 3, 1, 0))
for label, replacement in (("residuals", "residuals"), ("samples", "samples")):
    tick = time.perf_counter()
    cold = ksvd(samples.T, initial, 15, max_iter=sweeps, tol=1e-4, coherence_threshold=0.95,
                replacement=replacement)
    seconds = (time.perf_counter() - tick) / max(cold.n_iter, 1)
    print(f"{label}: errors {[round(float(e), 4) for e in cold.errors]}, replaced per sweep "
          f"{[len(a) for a in cold.replaced_atoms]}, {seconds:.1f} s per sweep")
