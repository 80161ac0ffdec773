"""train-backbone (method.md B.1): DenseNet121 learning tag-cluster pseudo-labels.

Synthetic images the network must learn from their content (a bright square anywhere,
horizontal stripes, vertical stripes; noise everywhere), held-out accuracy recomputed from the
saved checkpoint through the feature path, resume checked against an uninterrupted run.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from pipelines.backbone import extract_features, load_backbone, weights_version
from pipelines.backbone_training import (
    BEST_CHECKPOINT, LAST_CHECKPOINT, RadiologyAugment, _EarlyStopping, classification_scores,
    group_split, merge_small_classes, stratified_split, train_backbone, warmup_cosine_lr,
)

CHANCE = 1 / 3


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def shapes_dataset(n_per_class: int, size: int = 32, n_classes: int = 3, seed: int = 0):
    """Class 0: a 12 x 12 bright square at a random place; 1: horizontal stripes; 2: vertical
    stripes. Grey repeated to 3 channels, as the pixel pipeline does."""
    generator = torch.Generator().manual_seed(seed)
    images, labels = [], []
    for label in range(n_classes):
        for _ in range(n_per_class):
            image = 0.3 * torch.randn(1, size, size, generator=generator)
            if label == 0:
                row, col = torch.randint(0, size - 12, (2,), generator=generator).tolist()
                image[:, row:row + 12, col:col + 12] += 2.0
            elif label == 1:
                image[:, ::4, :] += 2.0
            else:
                image[:, :, ::4] += 2.0
            images.append(image.expand(3, size, size).clone())
            labels.append(label)
    return TensorDataset(torch.stack(images), torch.tensor(labels)), labels


def random_label_dataset(n_images: int = 16, size: int = 32, seed: int = 0):
    """Noise with random labels: nothing to learn, so validation stops improving."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n_images, 3, size, size, generator=generator)
    labels = [index % 2 for index in range(n_images)]
    return TensorDataset(images, torch.tensor(labels)), labels


def misleading_dataset(n_images: int = 16, size: int = 32, *, val_fraction: float, seed: int):
    """Brightness gives the class in the training split and the opposite class in the held-out
    split (chosen with the same seeded split): the more the network learns, the worse it
    validates, so validation stops improving after the first epoch."""
    labels = [index % 2 for index in range(n_images)]
    _, val_indices = stratified_split(labels, val_fraction=val_fraction, seed=seed)
    sign = torch.tensor([1.0 if label else -1.0 for label in labels])
    sign[torch.as_tensor(val_indices)] *= -1
    noise = 0.3 * torch.randn(n_images, 3, size, size,
                              generator=torch.Generator().manual_seed(seed))
    return TensorDataset(noise + sign[:, None, None, None], torch.tensor(labels)), labels


class Interrupted(Exception):
    pass


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    dataset, labels = shapes_dataset(n_per_class=20)
    records = []
    checkpoint_dir = tmp_path_factory.mktemp("backbone")
    result = train_backbone(
        dataset, labels, classes=[11, 12, 13], checkpoint_dir=checkpoint_dir,
        tag_cluster_run=7, epochs=4, batch_size=8, val_fraction=0.25, patience=10, seed=0,
        min_val_images=10, progress=records.append)
    return dataset, labels, result, records


def test_training_beats_chance_on_held_out_split(trained):
    _, _, result, records = trained
    print(f"held-out accuracy per epoch: {[r['val_accuracy'] for r in result.history]} "
          f"(chance {CHANCE:.2f})")
    assert result.best_val_accuracy >= 0.8 > CHANCE + 0.4
    assert [record["epoch"] for record in result.history] == [1, 2, 3, 4]
    assert result.epochs_run == 4 and not result.stopped_early
    assert records == result.history
    best = result.history[result.best_epoch - 1]
    assert best["val_accuracy"] == result.best_val_accuracy
    assert best["val_balanced_accuracy"] == result.best_val_balanced_accuracy
    assert best["val_per_class_accuracy"] == result.best_val_per_class_accuracy
    assert all(record["val_balanced_accuracy"] <= result.best_val_balanced_accuracy
               for record in result.history)


def test_checkpoint_reproduces_reported_accuracy_through_the_feature_path(trained):
    """Independent of the training loop: load best.pt as the feature worker does, classify the
    held-out images from the pooled features, count."""
    dataset, labels, result, _ = trained
    _, val_indices = stratified_split(labels, val_fraction=0.25, seed=0)
    backbone = load_backbone(result.checkpoint_path)
    images, targets = dataset[torch.as_tensor(val_indices)]
    maps, pooled = extract_features(backbone, images)
    assert maps.shape == (len(val_indices), 1024, 1, 1)
    with torch.no_grad():
        predicted = backbone.module.classifier(pooled).argmax(dim=1)
    assert float((predicted == targets).double().mean()) == result.best_val_accuracy


def test_checkpoint_metadata(trained):
    _, _, result, _ = trained
    backbone = load_backbone(result.checkpoint_path)
    metadata = backbone.metadata
    assert backbone.model_version == weights_version(result.checkpoint_path)
    assert backbone.module.classifier.out_features == 3
    assert metadata["classes"] == [11, 12, 13] and metadata["tag_cluster_run"] == 7
    assert metadata["epoch"] == metadata["best_epoch"] == result.best_epoch
    assert metadata["epochs_run"] == 4 and metadata["finished"] and not metadata["stopped_early"]
    assert metadata["best_val_accuracy"] == result.best_val_accuracy
    assert metadata["torch_version"] == str(torch.__version__)
    assert metadata["input_size"] == [32, 32]
    assert metadata["normalisation"] == {"mean": [0.485, 0.456, 0.406],
                                         "std": [0.229, 0.224, 0.225]}
    assert (metadata["n_train"], metadata["n_val"]) == (45, 15)
    last = load_backbone(result.checkpoint_path.with_name(LAST_CHECKPOINT))
    assert last.metadata["epoch"] == 4


def test_resume_continues_from_saved_epoch_like_an_uninterrupted_run(tmp_path):
    dataset, labels = shapes_dataset(n_per_class=8, n_classes=2, seed=1)
    options = dict(classes=["a", "b"], tag_cluster_run=None, epochs=3, batch_size=4,
                   val_fraction=0.25, patience=10, seed=3, min_val_images=4)
    reference = train_backbone(dataset, labels, checkpoint_dir=tmp_path / "reference",
                               **options)

    def stop_after_first_epoch(record):
        raise Interrupted

    with pytest.raises(Interrupted):
        train_backbone(dataset, labels, checkpoint_dir=tmp_path / "resumed",
                       progress=stop_after_first_epoch, **options)
    saved = torch.load(tmp_path / "resumed" / LAST_CHECKPOINT, weights_only=True)
    assert saved["training_state"]["epoch"] == 1
    assert (tmp_path / "resumed" / BEST_CHECKPOINT).is_file()

    seen = []
    resumed = train_backbone(dataset, labels, checkpoint_dir=tmp_path / "resumed",
                             progress=seen.append, **options)
    assert [record["epoch"] for record in seen] == [2, 3]
    assert [record["epoch"] for record in resumed.history] == [1, 2, 3]

    def metrics(history):
        return [{k: v for k, v in record.items()
                 if k not in ("seconds", "train_images_per_second")} for record in history]

    assert metrics(resumed.history) == metrics(reference.history)
    final = {name: torch.load(tmp_path / name / LAST_CHECKPOINT, weights_only=True)
             for name in ("reference", "resumed")}
    for key, value in final["reference"]["model_state"].items():
        assert torch.equal(final["resumed"]["model_state"][key], value), key


def test_resume_refuses_another_runs_checkpoint_and_can_start_over(tmp_path):
    dataset, labels = random_label_dataset()
    options = dict(classes=[0, 1], tag_cluster_run=1, epochs=1, batch_size=4,
                   checkpoint_dir=tmp_path, min_val_images=2)
    train_backbone(dataset, labels, seed=0, **options)
    with pytest.raises(ValueError, match="different training run.*seed"):
        train_backbone(dataset, labels, seed=1, **options)
    restarted = train_backbone(dataset, labels, seed=1, resume=False, **options)
    assert [record["epoch"] for record in restarted.history] == [1]


def test_early_stopping_after_patience_epochs_without_improvement(tmp_path):
    dataset, labels = misleading_dataset(val_fraction=0.25, seed=0)
    options = dict(classes=[0, 1], tag_cluster_run=None, epochs=10, batch_size=4,
                   val_fraction=0.25, patience=2, seed=0, checkpoint_dir=tmp_path,
                   min_val_images=4)
    result = train_backbone(dataset, labels, **options)
    print(f"validation accuracy per epoch: {[r['val_accuracy'] for r in result.history]}")
    assert result.stopped_early and result.best_epoch == 1 and result.epochs_run == 3
    assert [record["improved"] for record in result.history] == [True, False, False]
    assert load_backbone(result.checkpoint_path).metadata["epoch"] == result.best_epoch
    assert load_backbone(result.checkpoint_path).metadata["stopped_early"] is True

    calls = []  # a finished run is not trained again
    again = train_backbone(dataset, labels, progress=calls.append, **options)
    assert calls == [] and again.history == result.history and again.stopped_early


def test_early_stopping_rule():
    stopping = _EarlyStopping(patience=2)
    steps = [(1, 0.5, 1.0), (2, 0.5, 0.9), (3, 0.4, 0.1), (4, 0.5, 0.9), (5, 0.6, 2.0),
             (6, 0.6, 2.0), (7, 0.3, 0.1)]
    improved = [stopping.update(*step) for step in steps]
    # equal accuracy counts only with a lower loss; a lower loss alone does not count
    assert improved == [True, True, False, False, True, False, False]
    assert stopping.should_stop and stopping.best_epoch == 5


def test_stratified_split():
    labels = [0] * 10 + [1] * 5 + [2]
    train, val = stratified_split(labels, val_fraction=0.2, seed=0)
    labels = np.asarray(labels)
    assert np.bincount(labels[val], minlength=3).tolist() == [2, 1, 0]
    assert np.intersect1d(train, val).size == 0
    assert sorted([*train, *val]) == list(range(16))
    again_train, again_val = stratified_split(labels, val_fraction=0.2, seed=0)
    assert np.array_equal(val, again_val) and np.array_equal(train, again_train)
    other = [stratified_split(labels, val_fraction=0.2, seed=seed)[1] for seed in range(1, 6)]
    assert any(not np.array_equal(val, other_val) for other_val in other)


@pytest.mark.parametrize("change, match", [
    (dict(labels=[0, 1, 0]), "one entry per dataset item"),
    (dict(labels=[0, 1] * 7 + [0, 2]), "class indices"),
    (dict(classes=[0]), "at least 2 classes"),
    (dict(val_fraction=0.0), "val_fraction"),
    (dict(patience=0), "patience"),
])
def test_invalid_arguments(tmp_path, change, match):
    dataset, labels = random_label_dataset()
    arguments = dict(labels=labels, classes=[0, 1], val_fraction=0.2, patience=5,
                     min_val_images=2)
    arguments.update(change)
    with pytest.raises(ValueError, match=match):
        train_backbone(dataset, arguments.pop("labels"), checkpoint_dir=tmp_path,
                       tag_cluster_run=None, **arguments)


def grouped_labels(seed: int = 0):
    """Groups (studies) of 1 to 6 images; most studies hold one class, some mix two."""
    rng = np.random.default_rng(seed)
    labels, groups = [], []
    for study in range(120):
        size = int(rng.integers(1, 7))
        main = int(rng.integers(0, 4))
        for _ in range(size):
            labels.append(main if rng.random() < 0.8 else int(rng.integers(0, 4)))
            groups.append(f"1.2.{study}")
    return np.asarray(labels), groups


def test_group_split_keeps_every_study_on_one_side():
    labels, groups = grouped_labels()
    groups_array = np.asarray(groups)
    train, val = group_split(labels, groups, val_fraction=0.2, seed=0)
    assert sorted([*train, *val]) == list(range(labels.size))
    assert not set(groups_array[train]) & set(groups_array[val])
    assert 0.15 <= val.size / labels.size <= 0.3
    assert set(labels[val]) == set(labels[train]) == {0, 1, 2, 3}
    again = group_split(labels, groups, val_fraction=0.2, seed=0)
    assert np.array_equal(again[1], val)
    assert not np.array_equal(group_split(labels, groups, val_fraction=0.2, seed=1)[1], val)
    # the per-image split this replaces shares studies between the sides
    _, image_val = stratified_split(labels, val_fraction=0.2, seed=0)
    image_train = np.setdiff1d(np.arange(labels.size), image_val)
    assert set(groups_array[image_train]) & set(groups_array[image_val])


def test_group_split_keeps_a_single_group_class_in_training():
    labels = [0] * 6 + [1] * 6 + [1] * 2
    groups = ["a"] * 6 + ["b"] * 3 + ["c"] * 3 + ["d"] * 2
    train, val = group_split(labels, groups, val_fraction=0.3, seed=0)
    assert set(np.asarray(groups)[val]) <= {"b", "c", "d"}  # "a" is class 0's only group
    assert np.asarray(labels)[train].tolist().count(0) == 6
    assert np.array_equal(group_split(labels, None, val_fraction=0.3, seed=0)[1],
                          stratified_split(labels, val_fraction=0.3, seed=0)[1])


def test_warmup_cosine_schedule_values():
    options = dict(base_lr=1e-3, warmup_steps=4, total_steps=14, final_fraction=0.01)
    values = [warmup_cosine_lr(step, **options) for step in range(16)]
    assert values[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert values[4] == pytest.approx(1e-3)  # decay starts at the peak
    assert values[9] == pytest.approx(1e-3 * (0.01 + 0.99 * 0.5))  # half way: mean of ends
    assert all(a >= b for a, b in zip(values[4:14], values[5:14]))
    assert values[14] == values[15] == pytest.approx(1e-5)
    assert warmup_cosine_lr(0, base_lr=1.0, warmup_steps=0, total_steps=10) == 1.0


def test_classification_scores_match_scikit_learn():
    from sklearn.metrics import balanced_accuracy_score, confusion_matrix, recall_score

    rng = np.random.default_rng(0)
    truth = rng.choice([0, 1, 2, 4], size=200, p=[0.7, 0.2, 0.05, 0.05])  # class 3 absent
    predicted = np.where(rng.random(200) < 0.6, truth, rng.integers(0, 5, 200))
    confusion = confusion_matrix(truth, predicted, labels=range(5))
    scores = classification_scores(torch.as_tensor(confusion))
    assert scores["accuracy"] == pytest.approx(float((truth == predicted).mean()))
    with pytest.warns(UserWarning):  # scikit-learn warns about the predicted-only class 3
        expected = balanced_accuracy_score(truth, predicted)
    assert scores["balanced_accuracy"] == pytest.approx(expected)
    per_class = recall_score(truth, predicted, labels=[0, 1, 2, 4], average=None)
    assert scores["per_class_accuracy"][3] is None and scores["support"][3] == 0
    assert [scores["per_class_accuracy"][c] for c in (0, 1, 2, 4)] == pytest.approx(per_class)


def test_radiology_augment_is_seeded_and_keeps_the_grey_range():
    dataset, _ = shapes_dataset(n_per_class=2, size=40)
    images = dataset.tensors[0]
    augment = RadiologyAugment()
    first = augment(images, torch.Generator().manual_seed(5))
    assert torch.equal(first, augment(images, torch.Generator().manual_seed(5)))
    assert not torch.equal(first, augment(images, torch.Generator().manual_seed(6)))
    assert first.shape == images.shape
    grey = first[:, 0] * 0.229 + 0.485
    assert grey.min() >= -1e-5 and grey.max() <= 1 + 1e-5
    identity = RadiologyAugment(min_crop_area=1.0, max_rotation=0.0, window=0.0, max_gamma=1.0)
    unit = (images * torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
            + torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
    clipped = (unit.clamp(0, 1) - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) \
        / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    assert torch.allclose(identity(images, torch.Generator().manual_seed(0)), clipped,
                          atol=1e-4)


def test_interrupted_epoch_resumes_at_the_next_batch_like_an_uninterrupted_run(tmp_path):
    dataset, labels = shapes_dataset(n_per_class=10, n_classes=2, seed=2)
    groups = [f"study{index // 2}" for index in range(len(labels))]  # pairs of images
    options = dict(classes=[5, 6], tag_cluster_run=None, groups=groups, epochs=2,
                   batch_size=4, val_fraction=0.25, patience=10, seed=1, min_val_images=4,
                   augment=RadiologyAugment(), precision="fp32")
    reference_batches = []
    reference = train_backbone(dataset, labels, checkpoint_dir=tmp_path / "reference",
                               batch_progress=reference_batches.append, **options)
    assert [(r["epoch"], r["batch"]) for r in reference_batches] == [
        (1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (2, 3), (2, 4)]
    lrs = [record["lr"] for record in reference_batches]
    assert lrs == pytest.approx([warmup_cosine_lr(step, base_lr=1e-3, warmup_steps=4,
                                                  total_steps=8) for step in range(8)])

    import threading

    stop = threading.Event()

    def stop_in_second_batch(record):
        if (record["epoch"], record["batch"]) == (1, 2):
            stop.set()

    first = train_backbone(dataset, labels, checkpoint_dir=tmp_path / "resumed",
                           batch_progress=stop_in_second_batch, stop=stop, **options)
    assert first.interrupted and first.epochs_run == 0
    saved = torch.load(tmp_path / "resumed" / LAST_CHECKPOINT, weights_only=True)
    assert saved["training_state"]["epoch"] == 0
    assert saved["training_state"]["partial_epoch"]["batches_done"] == 2

    seen = []
    resumed = train_backbone(dataset, labels, checkpoint_dir=tmp_path / "resumed",
                             batch_progress=seen.append, **options)
    assert [(r["epoch"], r["batch"]) for r in seen][:3] == [(1, 3), (1, 4), (2, 1)]
    assert not resumed.interrupted

    def metrics(history):
        return [{k: v for k, v in record.items()
                 if k not in ("seconds", "train_images_per_second")} for record in history]

    assert metrics(resumed.history) == metrics(reference.history)
    final = {name: torch.load(tmp_path / name / LAST_CHECKPOINT, weights_only=True)
             for name in ("reference", "resumed")}
    for key, value in final["reference"]["model_state"].items():
        assert torch.equal(final["resumed"]["model_state"][key], value), key


def test_refuses_a_held_out_set_too_small_to_mean_anything(tmp_path):
    dataset, labels = shapes_dataset(n_per_class=10, n_classes=2)
    groups = ["one patient"] * 10 + ["another"] * 10  # one group per class: nothing held out
    with pytest.raises(ValueError, match="held-out set would have 0 images.*fewer than the 30"):
        train_backbone(dataset, labels, classes=[0, 1], checkpoint_dir=tmp_path,
                       tag_cluster_run=None, groups=groups)
    with pytest.raises(ValueError, match="would have 4 images"):
        train_backbone(dataset, labels, classes=[0, 1], checkpoint_dir=tmp_path,
                       tag_cluster_run=None, val_fraction=0.2)


def test_merge_small_classes_joins_the_nearest_kept_medoid():
    distances = np.array([[0.0, 0.9, 0.2, 0.5, 0.8],
                          [0.9, 0.0, 0.7, 0.3, 0.1],
                          [0.2, 0.7, 0.0, 0.6, 0.4],
                          [0.5, 0.3, 0.6, 0.0, 0.5],
                          [0.8, 0.1, 0.4, 0.5, 0.0]])
    target = merge_small_classes([50, 40, 3, 9, 2], distances, min_size=10)
    assert target.tolist() == [0, 1, 0, 1, 1]
    assert merge_small_classes([50, 40, 3, 9, 2], None, min_size=10).tolist() == [0, 1, 0, 0, 0]
    # fewer than two clusters reach the minimum: the two largest are kept
    assert merge_small_classes([5, 40, 3, 9, 2], distances, min_size=10).tolist() == [
        3, 1, 3, 3, 1]
    sizes = np.array([50, 40, 3, 9, 2])
    assert np.bincount(target, weights=sizes).sum() == sizes.sum()  # every image kept
