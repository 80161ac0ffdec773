"""Synthetic DICOM-like mixed tag table shared by the clustering benchmarks.

60 numeric + 25 categorical columns, 20 % of cells missing at random (the issue-5 setting).
Numeric columns mix continuous values (e.g. positions, exposure) with low-cardinality ones
(pixel spacing, slice thickness, bits stored); categorical columns have 2 to 300 categories.
Rows are drawn around 15 latent "protocols" so that clustering has structure to find.
"""

from __future__ import annotations

import numpy as np

N_NUMERIC = 60
N_CATEGORICAL = 25
MISSING_SHARE = 0.2
CATEGORY_COUNTS = (2, 2, 3, 3, 4, 5, 5, 6, 8, 8, 10, 12, 12, 15, 20, 20, 25, 30, 40, 50,
                   60, 80, 100, 200, 300)


def make_tag_table(
    n_rows: int, *, n_protocols: int = 15, seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``numeric`` (n_rows, 60) float64 with NaN and ``categorical`` (n_rows, 25)
    object with None."""
    rng = np.random.default_rng(seed)
    protocol = rng.integers(0, n_protocols, size=n_rows)
    centres = rng.normal(0.0, 3.0, size=(n_protocols, N_NUMERIC))
    numeric = centres[protocol] + rng.normal(0.0, 1.0, size=(n_rows, N_NUMERIC))
    numeric[:, :30] = np.round(numeric[:, :30])          # low-cardinality numeric tags
    numeric[:, 30:40] = np.exp(numeric[:, 30:40] / 3.0)  # skewed positive (exposure-like)
    numeric[rng.random(numeric.shape) < MISSING_SHARE] = np.nan

    categorical = np.empty((n_rows, N_CATEGORICAL), dtype=object)
    for feature, count in enumerate(CATEGORY_COUNTS):
        typical = rng.integers(0, count, size=n_protocols)
        noise = rng.integers(0, count, size=n_rows)
        keep_typical = rng.random(n_rows) < 0.7
        codes = np.where(keep_typical, typical[protocol], noise)
        categorical[:, feature] = np.array([f"v{code}" for code in codes], dtype=object)
    categorical[rng.random(categorical.shape) < MISSING_SHARE] = None
    return numeric, categorical
