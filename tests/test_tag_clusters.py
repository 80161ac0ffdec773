"""Tag clustering runs in a real PostgreSQL: fit, Dask assignment, stable labels, the active
view, the advisory lock, resuming, and new instances assigned by the tags worker."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import sqlalchemy as sa
from pydicom.uid import generate_uid

from service.tags import features, tag_clusters
from service.tags.tag_clusters import ReclusterOptions

from .dicom_client import ingest_datasets, make_ct

# Four groups that differ in several tags each; a clustering that does not find them is wrong.
GROUPS = {
    "ct_chest": dict(Modality="CT", BodyPartExamined="CHEST", Manufacturer="GE MEDICAL SYSTEMS",
                     SliceThickness="1.25", KVP="120", PixelSpacing=[0.7, 0.7]),
    "ct_head": dict(Modality="CT", BodyPartExamined="HEAD", Manufacturer="SIEMENS",
                    SliceThickness="5", KVP="100", PixelSpacing=[0.45, 0.45]),
    "mr_brain": dict(Modality="MR", BodyPartExamined="BRAIN", Manufacturer="Philips",
                     SliceThickness="3", PixelSpacing=[0.9, 0.9], RepetitionTime="500",
                     EchoTime="15", MagneticFieldStrength="3"),
    "cr_knee": dict(Modality="CR", BodyPartExamined="KNEE", Manufacturer="FUJIFILM",
                    KVP="60", PixelSpacing=[0.15, 0.15]),
}


def _series(group: str, slices: int) -> list:
    study, series = generate_uid(), generate_uid()
    table_height = str(100 + len(_series.heights))  # differs per series, as on a scanner
    _series.heights.append(table_height)
    datasets = []
    for number in range(1, slices + 1):
        ds = make_ct(study=study, series=series)
        for keyword, value in GROUPS[group].items():
            setattr(ds, keyword, value)
        if group != "ct_chest":
            del ds.ImageOrientationPatient  # another plane-free group
        if group == "mr_brain":
            del ds.KVP
        if group == "cr_knee":
            del ds.SliceThickness
        ds.InstanceNumber = number
        ds.TableHeight = table_height
        ds.WindowCenter = str(40 + number % 3)  # and a little per slice
        datasets.append(ds)
    return datasets


_series.heights = []


def _add(engine, tmp_path, plan: dict[str, list[int]]) -> dict[str, str]:
    """Ingest series per group and parse their tags; returns SOP Instance UID -> group."""
    group_of, datasets = {}, []
    for group, sizes in plan.items():
        for slices in sizes:
            for ds in _series(group, slices):
                group_of[ds.SOPInstanceUID] = group
                datasets.append(ds)
    ingest_datasets(engine, tmp_path / "storage", datasets)
    while features.process_queue_batch(engine, "test", limit=500):
        pass
    return group_of


def _options(**changes) -> ReclusterOptions:
    # 59 instances are 25 distinct profiles: K <= 25 / 5 keeps K = 4 within the bound
    base = dict(candidates=(2, 3, 4, 5, 6), partition_rows=25, n_workers=2, processes=False,
                min_profiles_per_cluster=5)
    return ReclusterOptions(**{**base, **changes})


def _labels(engine) -> dict[str, int]:
    with engine.connect() as conn:
        return dict(conn.execute(sa.text(
            "SELECT sop_instance_uid, tag_cluster FROM instance_tag_cluster")).all())


def _purity(labels: dict[str, int], group_of: dict[str, str]) -> set[tuple[str, int]]:
    return {(group_of[uid], label) for uid, label in labels.items()}


@pytest.fixture
def archive(engine, tmp_path):
    group_of = _add(engine, tmp_path, {"ct_chest": [12, 9], "ct_head": [10, 8],
                                       "mr_brain": [7, 6], "cr_knee": [3, 2, 2]})
    return engine, group_of


def test_a_run_finds_the_groups_and_labels_every_instance(archive, database_url):
    engine, group_of = archive
    summary = tag_clusters.recluster(engine, database_url, _options())

    assert summary.status == "finished" and summary.k == 4
    assert summary.instances == summary.assigned == len(group_of) == 59
    labels = _labels(engine)
    assert labels.keys() == group_of.keys()
    # one label per group, different groups different labels
    pairs = _purity(labels, group_of)
    assert len(pairs) == 4 and len({label for _, label in pairs}) == 4
    # the first run numbers clusters by size: the largest group is cluster 0
    assert dict(pairs)["ct_chest"] == 0
    with engine.connect() as conn:
        run = conn.execute(sa.text("SELECT * FROM tag_cluster_runs")).mappings().one()
        clusters = conn.execute(sa.text(
            "SELECT tag_cluster, instances, medoid_features->>'modality' AS modality, "
            "medoid_features->>'body_part' AS body_part FROM tag_clusters "
            "ORDER BY tag_cluster")).mappings().all()
        partitions = conn.execute(sa.text(
            "SELECT count(*), count(done_at), sum(rows) FROM tag_cluster_partitions")).one()
    assert run["is_active"] and run["status"] == "finished"
    assert set(run["k_table"]) == {"2", "3", "4", "5"}  # 6 > 25 profiles / 5
    assert run["k_table"]["4"] == max(run["k_table"].values()) == run["silhouette"]
    assert len(run["sample"]["labels"]) == run["profiles_clustered"]
    assert [(c["instances"], c["modality"], c["body_part"]) for c in clusters] == [
        (21, "CT", "CHEST"), (18, "CT", "HEAD"), (13, "MR", "BRAIN"), (7, "CR", "KNEE")]
    assert partitions[0] == partitions[1] == 3 and partitions[2] == 59  # 59 rows / 25


def test_distances_in_sql_equal_the_models_own_assignment(archive, database_url):
    engine, _ = archive
    summary = tag_clusters.recluster(engine, database_url, _options())
    with engine.connect() as conn:
        model = tag_clusters.load_model(conn, summary.run_id)
        rows = conn.execute(sa.text(
            "SELECT f.sop_instance_uid, " + ", ".join(f'f."{c}"' for c in model.columns)
            + ", a.medoid_index, a.distance FROM instance_features f JOIN "
            "tag_cluster_assignments a USING (sop_instance_uid) ORDER BY 1")).all()
    k = len(model.columns)
    medoid, distance = model.assign(model.encode([row[1:k + 1] for row in rows]))
    assert medoid.tolist() == [row[k + 1] for row in rows]
    np.testing.assert_allclose(distance, [row[k + 2] for row in rows], rtol=1e-6, atol=1e-7)


def test_a_second_run_keeps_the_labels_of_the_same_groups(archive, database_url, tmp_path):
    engine, group_of = archive
    tag_clusters.recluster(engine, database_url, _options())
    first = _labels(engine)
    # the knee group grows from the smallest to the largest: the fit sees the groups in
    # another order, and the labels must still follow the groups
    group_of.update(_add(engine, tmp_path, {"cr_knee": [30, 20]}))
    summary = tag_clusters.recluster(engine, database_url, _options())
    second = _labels(engine)

    assert summary.status == "finished"
    assert all(second[uid] == label for uid, label in first.items())
    assert _purity(second, group_of) == _purity(first, group_of)
    assert summary.relabelled != {i: i for i in range(4)}  # the raw order did change
    with engine.connect() as conn:
        runs = conn.execute(sa.text(
            "SELECT id, is_active, previous_run_id FROM tag_cluster_runs ORDER BY id")).all()
    assert [(r.is_active, r.previous_run_id) for r in runs] == [(False, None),
                                                                (True, runs[0].id)]


def test_nothing_changed_means_nothing_to_do_unless_forced(archive, database_url):
    engine, _ = archive
    first = tag_clusters.recluster(engine, database_url, _options())
    again = tag_clusters.recluster(engine, database_url, _options())
    forced = tag_clusters.recluster(engine, database_url, _options(force=True))
    assert again.status == "skipped" and again.run_id == first.run_id
    assert forced.status == "finished" and forced.run_id != first.run_id


def test_another_feature_list_or_parameter_set_is_a_change(archive, database_url):
    from parsers.selection import FeatureSelection, default_selection

    engine, _ = archive
    first = tag_clusters.recluster(engine, database_url, _options())
    shipped = default_selection()
    fewer = FeatureSelection(columns=tuple(c for c in shipped.columns if c != "window_center"),
                             reasons=shipped.reasons, mode="auto")
    other_columns = tag_clusters.recluster(engine, database_url, _options(selection=fewer))
    assert other_columns.status == "finished" and other_columns.run_id != first.run_id
    with engine.connect() as conn:
        stored = conn.execute(sa.text(
            "SELECT feature_selection FROM tag_cluster_runs WHERE is_active")).scalar()
    assert "window_center" not in stored["columns"]
    assert tag_clusters.recluster(engine, database_url,
                                  _options(selection=fewer)).status == "skipped"
    other_parameters = tag_clusters.recluster(
        engine, database_url, _options(selection=fewer, min_profiles_per_cluster=3))
    assert other_parameters.status == "finished"
    assert tag_clusters.recluster(engine, database_url, _options(
        selection=fewer, min_profiles_per_cluster=3)).status == "skipped"


def test_the_default_k_bound_keeps_k_below_a_tenth_of_the_profiles(archive, database_url):
    engine, _ = archive
    summary = tag_clusters.recluster(engine, database_url, _options(
        min_profiles_per_cluster=ReclusterOptions().min_profiles_per_cluster))
    with engine.connect() as conn:
        run = conn.execute(sa.text("SELECT * FROM tag_cluster_runs")).mappings().one()
    assert run["profiles"] == 25 and run["model"]["k_bound"] == 2
    assert summary.k == 2 and set(run["k_table"]) == {"2"}


def test_instances_that_fit_no_cluster_are_marked_as_outliers(archive, database_url, tmp_path):
    from pipelines.tag_clustering import outlier_threshold

    engine, group_of = archive
    odd = []
    for number in range(3):  # no body part, another modality and maker, nothing in common
        ds = make_ct()
        ds.Modality, ds.Manufacturer, ds.KVP = "OT", f"ACME {number}", str(40 + number)
        ds.PixelSpacing, ds.SliceThickness = [2.5, 2.5], "10"
        del ds.ImageOrientationPatient  # (the CT has no BodyPartExamined)
        odd.append(ds.SOPInstanceUID)
        ingest_datasets(engine, tmp_path / "storage", [ds])
    while features.process_queue_batch(engine, "test"):
        pass
    tag_clusters.recluster(engine, database_url, _options(candidates=(4,)))
    with engine.connect() as conn:
        rows = conn.execute(sa.text(
            "SELECT sop_instance_uid, tag_cluster, distance, is_outlier "
            "FROM instance_tag_cluster")).all()
        threshold = conn.execute(sa.text(
            "SELECT outlier_distance FROM tag_cluster_runs WHERE is_active")).scalar()
        per_cluster = conn.execute(sa.text(
            "SELECT sum(outliers), min(outlier_distance) FROM tag_clusters")).one()
    assert len(rows) == len(group_of) + 3
    assert sorted(r.sop_instance_uid for r in rows if r.is_outlier) == sorted(odd)
    assert all(r.tag_cluster is not None for r in rows)  # labelled, and flagged
    assert threshold == pytest.approx(outlier_threshold(
        np.array([r.distance for r in rows], dtype=np.float32)))
    assert per_cluster == (3, threshold)
    # a new instance that fits no cluster is flagged by the tags worker's assignment too
    late = make_ct()
    late.Modality, late.Manufacturer, late.KVP = "OT", "ACME 9", "49"
    late.PixelSpacing, late.SliceThickness = [2.5, 2.5], "10"
    del late.ImageOrientationPatient
    ingest_datasets(engine, tmp_path / "storage", [late])
    while features.process_queue_batch(engine, "test"):
        pass
    with engine.connect() as conn:
        assert conn.execute(sa.text(
            "SELECT is_outlier FROM instance_tag_cluster WHERE sop_instance_uid = :u"),
            {"u": late.SOPInstanceUID}).scalar() is True


def test_two_jobs_never_overlap(archive, database_url):
    engine, _ = archive
    with engine.connect() as holder:
        holder.execute(sa.text("SELECT pg_advisory_lock(:k)"),
                       {"k": tag_clusters.RECLUSTER_LOCK_KEY})
        with pytest.raises(tag_clusters.ReclusterLocked, match="another recluster"):
            tag_clusters.recluster(engine, database_url, _options())
        holder.execute(sa.text("SELECT pg_advisory_unlock_all()"))
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM tag_cluster_runs")).scalar() == 0
    assert tag_clusters.recluster(engine, database_url, _options()).status == "finished"


def test_a_failed_run_resumes_with_the_partitions_left(archive, database_url):
    engine, group_of = archive
    victim = sorted(group_of)[40]  # in the second of three partitions
    with engine.begin() as conn:
        conn.execute(sa.text(f"""
            CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF NEW.sop_instance_uid = '{victim}' THEN RAISE EXCEPTION 'disk on fire'; END IF;
                RETURN NEW;
            END $$;
            CREATE TRIGGER refuse BEFORE INSERT ON tag_cluster_assignments
            FOR EACH ROW EXECUTE FUNCTION refuse();"""))
    with pytest.raises(tag_clusters.ReclusterError, match="disk on fire"):
        tag_clusters.recluster(engine, database_url, _options(n_workers=1))
    with engine.connect() as conn:
        run = conn.execute(sa.text("SELECT id, status, is_active, error "
                                   "FROM tag_cluster_runs")).one()
        done_before = conn.execute(sa.text(
            "SELECT partition FROM tag_cluster_partitions WHERE done_at IS NOT NULL")).scalars()
        done_before = set(done_before)
        assert _labels(engine) == {}  # nothing visible until a run finishes
    assert run.status == "assigning" and not run.is_active and "disk on fire" in run.error
    assert 1 not in done_before

    with engine.begin() as conn:
        conn.execute(sa.text("DROP TRIGGER refuse ON tag_cluster_assignments"))
    summary = tag_clusters.recluster(engine, database_url, _options())
    assert summary.run_id == run.id and summary.status == "finished"
    assert _labels(engine).keys() == group_of.keys()
    with engine.connect() as conn:
        assert conn.execute(sa.text(
            "SELECT count(*) FROM tag_cluster_assignments")).scalar() == len(group_of)


def test_new_instances_are_assigned_by_the_tags_worker(archive, database_url, tmp_path):
    engine, group_of = archive
    tag_clusters.recluster(engine, database_url, _options())
    before = _purity(_labels(engine), group_of)
    arrived = _add(engine, tmp_path, {"mr_brain": [4], "ct_head": [3]})
    labels = _labels(engine)
    assert arrived.keys() <= labels.keys()
    assert {(arrived[uid], labels[uid]) for uid in arrived} <= before


def test_a_run_with_a_dask_local_cluster_of_processes(archive, database_url):
    engine, group_of = archive
    summary = tag_clusters.recluster(engine, database_url, _options(processes=True))
    assert summary.assigned == len(group_of)


def test_the_report_of_the_active_run(archive, database_url, tmp_path):
    import html.parser

    from service.tags.cluster_report import render_cluster_report

    engine, group_of = archive
    tag_clusters.recluster(engine, database_url, _options())
    data = tag_clusters.report_data(engine)
    labels = _labels(engine)
    chest = {labels[uid] for uid, group in group_of.items() if group == "ct_chest"}.pop()

    assert data.k == 4 and sorted(data.cluster_sizes.values()) == [7, 13, 18, 21]
    assert data.cluster_sizes[chest] == 21
    assert data.top_values[chest]["modality"] == [("CT", 21)]
    assert data.top_values[chest]["body_part"] == [("CHEST", 21)]
    assert data.medoid_tags[chest]["manufacturer"] == "GE"  # the parser's canonical name
    assert set(data.sample_labels.tolist()) == set(data.cluster_sizes)
    page = render_cluster_report(data, tmp_path / "report")
    text = page.read_text()
    html.parser.HTMLParser().feed(text)
    assert "CHEST" in text and "KNEE" in text
    assert (tmp_path / "report" / "silhouette_samples.png").stat().st_size > 1000


def test_cli_recluster_exit_codes_report_and_lock(archive, settings, tmp_path, capsys,
                                                  monkeypatch):
    from service.cli import EXIT_LOCKED, main

    engine, _ = archive
    monkeypatch.setenv("DATABASE_URL", settings.database_url)
    monkeypatch.setenv("PACS_DATA_DIR", str(tmp_path / "data"))
    args = ["--candidates", "2,3,4,5,6", "--min-profiles-per-cluster", "5",
            "--partition-rows", "25", "--workers", "1", "--report", str(tmp_path / "report")]
    assert main(["recluster", *args]) == 0
    out = capsys.readouterr()
    assert "K = 4" in out.out and "now active" in out.out
    assert "partitions assigned" in out.err  # progress on stderr
    assert (tmp_path / "report" / "index.html").exists()
    assert main(["recluster", *args]) == 0
    assert "nothing changed" in capsys.readouterr().out

    with engine.connect() as holder:
        holder.execute(sa.text("SELECT pg_advisory_lock(:k)"),
                       {"k": tag_clusters.RECLUSTER_LOCK_KEY})
        assert main(["recluster", *args, "--force"]) == EXIT_LOCKED
        assert "another recluster" in capsys.readouterr().err
        holder.execute(sa.text("SELECT pg_advisory_unlock_all()"))

    assert main(["cluster-report", "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "index.html").exists()
    assert main(["cluster-report", "--run", "999", "--out", str(tmp_path / "none")]) == 2
    assert "no tag clustering run 999" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["recluster", "--candidates", "1,x"])
    assert exit_info.value.code == 2


def test_the_worker_sweep_labels_instances_a_run_switch_left_out(archive, database_url):
    engine, group_of = archive
    summary = tag_clusters.recluster(engine, database_url, _options())
    missing = sorted(group_of)[:5]
    with engine.begin() as conn:
        conn.execute(sa.text(
            "DELETE FROM tag_cluster_assignments WHERE sop_instance_uid = ANY(:uids)"),
            {"uids": missing})
    assert not set(missing) & _labels(engine).keys()
    cache = tag_clusters.ActiveModelCache()
    assert features.sweep_unassigned(engine, cache) == 5
    assert features.sweep_unassigned(engine, cache) == 0
    assert _labels(engine).keys() == group_of.keys()
    with engine.connect() as conn:
        assert conn.execute(sa.text(
            "SELECT count(DISTINCT run_id) FROM tag_cluster_assignments")).scalar() == 1
    with engine.connect() as conn:
        assert cache.active(conn).run_id == summary.run_id


def test_a_run_on_an_existing_dask_scheduler(archive, database_url):
    from distributed import LocalCluster

    engine, group_of = archive
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      dashboard_address=None) as cluster:
        summary = tag_clusters.recluster(engine, database_url,
                                         _options(scheduler=cluster.scheduler_address))
        assert len(cluster.scheduler.tasks) == 0  # the run released everything it sent
    assert summary.assigned == len(group_of)
    assert _labels(engine).keys() == group_of.keys()


def test_cluster_sizes_and_mean_distances_match_the_assignments(archive, database_url):
    engine, _ = archive
    summary = tag_clusters.recluster(engine, database_url, _options())
    with engine.connect() as conn:
        stored = {row.medoid_index: (row.instances, row.mean_distance) for row in conn.execute(
            sa.text("SELECT medoid_index, instances, mean_distance FROM tag_cluster_medoids"))}
        counted = {row[0]: (row[1], row[2]) for row in conn.execute(sa.text(
            "SELECT medoid_index, count(*), avg(distance) FROM tag_cluster_assignments "
            "GROUP BY 1"))}
        assigned = conn.execute(sa.text("SELECT assigned FROM tag_cluster_runs")).scalar()
    assert stored.keys() == counted.keys()
    for index, (instances, mean) in stored.items():
        assert instances == counted[index][0]
        assert abs(mean - counted[index][1]) < 1e-9
    assert assigned == summary.assigned == sum(n for n, _ in counted.values())
