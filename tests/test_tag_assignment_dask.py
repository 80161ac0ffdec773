"""Distributed tag assignment (method.md A.7) and the synthetic archive it is measured on.

The Dask tests share one LocalCluster of 2 worker processes (module fixture); one test
starts and closes its own through ``assign_partitions(scheduler=None)``.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from parsers import FEATURE_COLUMNS
from parsers.selection import default_selection
from parsers.values import plane_from_orientation
from pipelines.gower import GowerData, encode_features
from pipelines.tag_clustering import (
    PartitionAssignmentError, TagClusterModel, assign_partitions, fit_tag_clusters,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "clustering"))
from synthetic_archive import MODALITY_SHARES, archive_columns, make_archive  # noqa: E402

distributed = pytest.importorskip("distributed")
cloudpickle = pytest.importorskip("cloudpickle")
# Workers unpickle load/store by value, so they need not import this test module.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

KIND = {column.name: column.kind for column in FEATURE_COLUMNS}


# ---------------------------------------------------------------- load / store in workers


def load_rows(partition: tuple[int, int], *, directory: str, vocabularies) -> GowerData:
    """A key range of the encoded archive, read from .npy files like a SQL range scan."""
    start, stop = partition
    numeric = np.load(Path(directory) / "numeric.npy", mmap_mode="r")[start:stop]
    codes = np.load(Path(directory) / "codes.npy", mmap_mode="r")[start:stop]
    return GowerData(np.array(numeric), np.array(codes), vocabularies)


def load_rows_or_fail(partition, *, directory: str, vocabularies, broken) -> GowerData:
    if partition == broken:
        raise OSError(f"cannot read rows {partition}")
    return load_rows(partition, directory=directory, vocabularies=vocabularies)


def store_rows(partition: tuple[int, int], labels, distances, *, directory: str) -> int:
    start, stop = partition
    np.savez(Path(directory) / f"out-{start}-{stop}.npz", labels=labels, distances=distances)
    return int(labels.size)


MODEL_PICKLES: list[int] = []


class PickleCountingModel(TagClusterModel):
    """Counts how often the driver pickles the model (it unpickles as a TagClusterModel)."""

    def __reduce__(self):
        MODEL_PICKLES.append(1)
        return TagClusterModel, tuple(getattr(self, f.name) for f in fields(TagClusterModel))


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
            scheduler_kwargs={"dashboard": False, "dashboard_address": "127.0.0.1:0"},
            silence_logs=40) as local:
        yield local


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A small archive, its model, and the encoded rows on disk for the workers."""
    frame = make_archive(6000, seed=11)
    numeric_columns, categorical_columns = archive_columns()
    data = encode_features(frame[list(numeric_columns)].to_numpy(np.float64),
                           frame[list(categorical_columns)].to_numpy(object))
    model = fit_tag_clusters(data, candidates=(4, 8), max_profiles=600, random_state=3)
    directory = tmp_path_factory.mktemp("archive")
    np.save(directory / "numeric.npy", data.numeric)
    np.save(directory / "codes.npy", data.categorical)
    return model, data, str(directory)


def collect(directory: str, partitions) -> tuple[np.ndarray, np.ndarray]:
    labels, distances = [], []
    for start, stop in sorted(partitions):
        stored = np.load(Path(directory) / f"out-{start}-{stop}.npz")
        labels.append(stored["labels"])
        distances.append(stored["distances"])
    return np.concatenate(labels), np.concatenate(distances)


def uneven_partitions(n_rows: int) -> list[tuple[int, int]]:
    cuts = [0, 1, 777, 777, 2500, 2501, 4096, n_rows]  # includes an empty range
    return [(a, b) for a, b in zip(cuts[:-1], cuts[1:])]


# ---------------------------------------------------------------- assign_partitions


def test_partitions_give_exactly_the_whole_data_assignment(cluster, fitted, tmp_path):
    model, data, directory = fitted
    partitions = uneven_partitions(data.n_samples)
    seen: list[tuple[int, int]] = []
    stored = assign_partitions(
        model, partitions,
        functools.partial(load_rows, directory=directory, vocabularies=data.vocabularies),
        functools.partial(store_rows, directory=str(tmp_path)),
        scheduler=cluster.scheduler_address,
        progress=lambda done, total: seen.append((done, total)))

    assert stored == data.n_samples
    labels, distances = collect(str(tmp_path), partitions)
    expected_labels, expected_distances = model.assign(data)
    np.testing.assert_array_equal(labels, expected_labels)
    np.testing.assert_array_equal(distances, expected_distances)  # bit-identical
    assert seen == [(done, len(partitions)) for done in range(1, len(partitions) + 1)]
    assert len(set(labels.tolist())) == model.k


def test_failing_load_names_the_partition_and_keeps_the_cause(cluster, fitted, tmp_path):
    model, data, directory = fitted
    partitions = uneven_partitions(data.n_samples)
    load = functools.partial(load_rows_or_fail, directory=directory,
                             vocabularies=data.vocabularies, broken=(777, 2500))
    with pytest.raises(PartitionAssignmentError, match=r"partition \(777, 2500\).*OSError") as info:
        assign_partitions(model, partitions, load,
                          functools.partial(store_rows, directory=str(tmp_path)),
                          scheduler=cluster.scheduler_address)
    assert info.value.partition == (777, 2500)
    assert isinstance(info.value.__cause__, OSError)
    assert "cannot read rows (777, 2500)" in str(info.value.__cause__)


def test_model_is_sent_once_not_per_task(cluster, fitted, tmp_path):
    model, data, directory = fitted
    counting = PickleCountingModel(**{f.name: getattr(model, f.name)
                                      for f in fields(TagClusterModel)})
    MODEL_PICKLES.clear()
    partitions = [(start, min(start + 500, data.n_samples))
                  for start in range(0, data.n_samples, 500)]  # 12 tasks
    stored = assign_partitions(
        counting, partitions,
        functools.partial(load_rows, directory=directory, vocabularies=data.vocabularies),
        functools.partial(store_rows, directory=str(tmp_path)),
        scheduler=cluster.scheduler_address)
    assert stored == data.n_samples
    assert 1 <= len(MODEL_PICKLES) <= 2  # scattered to the 2 workers, never per task


def test_no_partitions_stores_nothing_and_starts_nothing(fitted):
    model, _, _ = fitted
    assert assign_partitions(model, [], load_rows, store_rows) == 0


def test_own_local_cluster_is_started_and_closed(fitted, tmp_path):
    psutil = pytest.importorskip("psutil")
    model, data, directory = fitted
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    partitions = [(0, 3000), (3000, data.n_samples)]
    stored = assign_partitions(
        model, partitions,
        functools.partial(load_rows, directory=directory, vocabularies=data.vocabularies),
        functools.partial(store_rows, directory=str(tmp_path)),
        n_workers=2)
    assert stored == data.n_samples
    labels, distances = collect(str(tmp_path), partitions)
    expected_labels, expected_distances = model.assign(data)
    np.testing.assert_array_equal(labels, expected_labels)
    np.testing.assert_array_equal(distances, expected_distances)
    after = {p.pid for p in psutil.Process().children(recursive=True) if p.is_running()
             and p.status() != psutil.STATUS_ZOMBIE}
    assert after <= before  # its worker processes are gone


# ---------------------------------------------------------------- the synthetic archive

# Columns a real archive varies between the instances of one series (among the default
# selection): exposure under dose modulation, slice position of sagittal/coronal MR, per-slice
# windows and PET scaling, and per-image view/laterality/exposure of radiographs.
PER_INSTANCE = {
    "xray_tube_current", "exposure", "exposure_time", "kvp", "image_position_x",
    "image_position_y", "window_center", "window_width", "rescale_slope", "view_position",
    "image_laterality", "number_of_frames", "distance_source_to_detector",
    "body_part_thickness", "compression_force",
}


@pytest.fixture(scope="module")
def archive():
    return make_archive(20_000, seed=7)


def test_archive_columns_and_types(archive):
    columns = default_selection().columns
    assert list(archive.columns) == ["sop_instance_uid", "series_instance_uid", *columns]
    assert len(archive) == 20_000
    assert archive["sop_instance_uid"].is_unique
    for name in columns:
        values = archive[name]
        if KIND[name] == "numeric":
            assert values.dtype == np.float64, name
        else:
            assert values.dtype == object, name
            assert all(v is None or isinstance(v, str) for v in set(values.tolist())), name


def test_archive_is_deterministic_per_seed(archive):
    pd.testing.assert_frame_equal(make_archive(20_000, seed=7), archive)
    other = make_archive(20_000, seed=8)
    assert not other["modality"].equals(archive["modality"])


def test_series_share_their_tags(archive):
    features = list(default_selection().columns)
    grouped = archive.groupby("series_instance_uid", sort=False)[features]
    # Distinct values per column and series (NaN/None count as a value of their own).
    distinct = grouped.nunique(dropna=False)
    sizes = grouped.size()
    varying = distinct.gt(1)
    assert set(varying.columns[varying.any()]) <= PER_INSTANCE
    modality = archive.groupby("series_instance_uid")["modality"].first().reindex(sizes.index)
    cross_sectional = modality.isin(["CT", "MR", "PT"])
    # slices of a volume differ in at most 4 of the 83 columns, radiographs in at most 8
    assert varying[cross_sectional].sum(axis=1).max() <= 4
    assert varying.sum(axis=1).max() <= 8
    assert varying[cross_sectional].any(axis=1).mean() > 0.5  # but many do differ
    slices = sizes[cross_sectional]
    # one series per modality may be cut short to hit the exact instance count
    assert len(slices) > 20 and (~slices.between(20, 500)).sum() <= 3 and slices.max() <= 500
    assert (distinct["modality"] == 1).all()


def test_missing_share_of_written_cells_is_5_to_10_percent(archive):
    complete = make_archive(20_000, seed=7, missing_share=0.0)
    features = [c for c in default_selection().columns if c != "body_part_inferred"]
    written = complete[features].notna().to_numpy()
    present = archive[features].notna().to_numpy()
    assert not (present & ~written).any()  # dropping never invents values
    share = (written & ~present).sum() / written.sum()
    assert 0.05 <= share <= 0.10
    both = present & written
    for index, name in enumerate(features):  # surviving values are the same values
        kept = both[:, index]
        assert archive[name][kept].equals(complete[name][kept]), name
    # the parser's inferred body part only where the stored one was dropped
    inferred = archive["body_part_inferred"].notna()
    assert inferred.any() and archive.loc[inferred, "body_part"].isna().all()
    assert complete["body_part_inferred"].isna().all()


def test_modalities_have_their_own_columns_and_values(archive):
    shares = archive["modality"].value_counts(normalize=True)
    for code, share in MODALITY_SHARES.items():
        assert abs(shares.get(code, 0.0) - share) <= 1 / len(archive), code
    ct, mr = archive[archive["modality"] == "CT"], archive[archive["modality"] == "MR"]
    assert ct["magnetic_field_strength"].isna().all() and mr["kvp"].isna().all()
    assert set(mr["magnetic_field_strength"].dropna()) <= {1.5, 3.0}
    assert set(ct["rescale_intercept"].dropna()) <= {-1024.0, -8192.0}
    assert set(ct["kvp"].dropna()) <= {100.0, 120.0, 140.0}
    # the plane column agrees with the real parser's reading of the orientation cosines
    orientation = [f"image_orientation_{i}" for i in range(1, 7)]
    rows = archive.dropna(subset=[*orientation, "plane"]).drop_duplicates(orientation)
    assert set(rows["plane"]) == {"AXIAL", "SAGITTAL", "CORONAL", "OBLIQUE"}
    for cosines, plane in zip(rows[orientation].itertuples(index=False), rows["plane"]):
        assert plane_from_orientation(tuple(cosines)).value == plane
