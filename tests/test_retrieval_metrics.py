"""Retrieval metrics, purity and IRMA error (method.md B, "Retrieval metrics")."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipelines.retrieval_metrics import (
    average_precision_at,
    binary_relevance,
    cluster_purity,
    count_relevant,
    dcg_at,
    evaluate_rankings,
    ideal_gains,
    irma_axis_errors,
    irma_error,
    mean_average_precision_at,
    ndcg_at,
    one_hot,
    overlap_gain,
    parse_irma_codes,
    precision_at,
    recall_at,
)

LOG2_3 = math.log2(3)  # 1.5849625...

# A single-label case used by several tests.
# database classes:   idx 0  1  2  3  4  5  6
DATABASE_CLASSES = np.array([0, 1, 0, 0, 1, 0, 2])   # class 0: 4 items, class 1: 2, class 2: 1
QUERY_CLASSES = np.array([0, 2, 1])
RANKED = np.array([
    [0, 1, 2, 3, 4],   # classes 0 1 0 0 1 -> rel 1 0 1 1 0
    [1, 4, 0, 2, 3],   # classes 1 1 0 0 0 -> rel 0 0 0 0 0 (query class 2)
    [0, 2, 3, 5, 1],   # classes 0 0 0 0 1 -> rel 0 0 0 0 1 (query class 1)
])
RELEVANCE = np.array([[1, 0, 1, 1, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 1]], dtype=bool)


def single_label_case():
    return one_hot(QUERY_CLASSES, 3), one_hot(DATABASE_CLASSES, 3)


# ---------------------------------------------------------------- relevance and gains

def test_one_hot():
    np.testing.assert_array_equal(
        one_hot(np.array([2, 0])), [[False, False, True], [True, False, False]])
    assert one_hot(np.array([1]), 4).shape == (1, 4)
    with pytest.raises(ValueError, match="n_classes=2"):
        one_hot(np.array([3]), 2)
    with pytest.raises(ValueError, match="integer"):
        one_hot(np.array([0.5]))


def test_binary_relevance_single_label_is_same_class():
    queries, database = single_label_case()
    np.testing.assert_array_equal(binary_relevance(queries, database[RANKED]), RELEVANCE)


def test_relevance_and_gain_multi_label_by_hand():
    # Q = {0, 1}; results {0}, {1, 2}, {2}, {0, 1}, {}
    query = np.array([[1, 1, 0]], dtype=bool)
    results = np.array([[[1, 0, 0], [0, 1, 1], [0, 0, 1], [1, 1, 0], [0, 0, 0]]], dtype=bool)
    # any shared label:         yes        yes        no         yes        no
    np.testing.assert_array_equal(binary_relevance(query, results), [[1, 1, 0, 1, 0]])
    # |Q∩L|/|Q∪L|:              1/2      1/3 (1 of {0,1,2})   0/3        2/2       0/2
    np.testing.assert_allclose(overlap_gain(query, results), [[1 / 2, 1 / 3, 0, 1, 0]])


def test_gain_of_two_empty_label_sets_is_zero():
    assert overlap_gain(np.zeros((1, 2), bool), np.zeros((1, 1, 2), bool))[0, 0] == 0.0


def test_labels_must_be_indicator_matrices():
    with pytest.raises(ValueError, match="one_hot"):
        count_relevant(QUERY_CLASSES, DATABASE_CLASSES)
    with pytest.raises(ValueError, match="0/1"):
        count_relevant(np.array([[2, 0]]), np.array([[1, 0]]))
    with pytest.raises(ValueError, match="label columns"):
        count_relevant(np.ones((1, 2), bool), np.ones((3, 4), bool))


# ---------------------------------------------------------------- P, R, AP, mAP

def test_precision_by_hand():
    # query 0, rel 1 0 1 1 0: P@1 = 1, P@2 = 1/2, P@3 = 2/3, P@5 = 3/5
    np.testing.assert_allclose(precision_at(RELEVANCE, [1, 2, 3, 5]),
                               [[1, 1 / 2, 2 / 3, 3 / 5],
                                [0, 0, 0, 0],
                                [0, 0, 0, 1 / 5]])


def test_count_relevant_and_recall_by_hand():
    queries, database = single_label_case()
    # relevant in the database: class 0 -> 4, class 2 -> 1, class 1 -> 2
    n_relevant = count_relevant(queries, database)
    np.testing.assert_array_equal(n_relevant, [4, 1, 2])
    # query 0 finds 1 of 4 by rank 2 and 3 of 4 by rank 5; query 2 finds 1 of 2 at rank 5
    np.testing.assert_allclose(recall_at(RELEVANCE, n_relevant, [2, 5]),
                               [[1 / 4, 3 / 4], [0, 0], [0, 1 / 2]])


def test_recall_is_zero_when_nothing_is_relevant():
    np.testing.assert_array_equal(recall_at(np.zeros((1, 3), bool), np.array([0]), [3]),
                                  [[0.0]])


def test_recall_rejects_more_hits_than_relevant_items():
    with pytest.raises(ValueError, match="more relevant items"):
        recall_at(np.ones((1, 3), bool), np.array([2]), [3])


def test_average_precision_by_hand():
    # query 0, rel 1 0 1 1 0, P@k at the hits: 1, 2/3, 3/4
    #   AP@2 = 1/1 = 1;  AP@3 = (1 + 2/3)/2 = 5/6;  AP@5 = (1 + 2/3 + 3/4)/3 = 29/36
    # query 1: no hit -> 0 at every N
    # query 2, rel 0 0 0 0 1: AP@2 = 0 (no hit yet); AP@5 = (1/5)/1 = 1/5
    expected = np.array([[1, 5 / 6, 29 / 36], [0, 0, 0], [0, 0, 1 / 5]])
    np.testing.assert_allclose(average_precision_at(RELEVANCE, [2, 3, 5]), expected)
    np.testing.assert_allclose(mean_average_precision_at(RELEVANCE, [2, 3, 5]),
                               expected.mean(axis=0))


def test_average_precision_divides_by_hits_in_top_n_not_min_n_r():
    # One relevant item, at rank 1, out of 10 relevant in the database: AP@5 = 1 by
    # method.md's definition (the min(N, R) variant would give 1/5).
    np.testing.assert_allclose(average_precision_at(np.array([[1, 0, 0, 0, 0]]), [5]), [[1.0]])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_average_precision_matches_scikit_learn(seed):
    # Where definitions coincide: sklearn's AP of the top-N relevance vector with strictly
    # decreasing scores is sum_k P@k rel_k / (hits in the top N). Queries without a hit are
    # left out: sklearn warns and its value there is not our 0.
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(seed)
    relevance = rng.random((20, 40)) < 0.4
    cutoffs = [5, 10, 20, 40]
    ours = average_precision_at(relevance, cutoffs)
    for query in range(relevance.shape[0]):
        for column, n in enumerate(cutoffs):
            top = relevance[query, :n]
            if top.any():
                reference = metrics.average_precision_score(top, -np.arange(n))
                assert ours[query, column] == pytest.approx(reference, abs=1e-12)


@pytest.mark.parametrize("bad_cutoffs, match", [
    ([0], "cutoffs"),      # ranks start at 1
    ([6], "cutoffs"),      # deeper than the 5-long ranking
    ([], "non-empty"),
    ([2.5], "ints"),
])
def test_cutoffs_are_checked(bad_cutoffs, match):
    with pytest.raises(ValueError, match=match):
        precision_at(RELEVANCE, bad_cutoffs)


def test_binary_metrics_reject_graded_relevance():
    with pytest.raises(ValueError, match="binary"):
        precision_at(np.array([[0.5, 1.0]]), [1])


# ---------------------------------------------------------------- nDCG

def multi_label_case():
    # database rows A={0}, B={1,2}, C={2}, D={0,1}, E={}; query Q={0,1}
    database = np.array([[1, 0, 0], [0, 1, 1], [0, 0, 1], [1, 1, 0], [0, 0, 0]], dtype=bool)
    query = np.array([[1, 1, 0]], dtype=bool)
    return query, database


def test_ndcg_by_hand():
    query, database = multi_label_case()
    # ranking A, B, C: gains 1/2, 1/3, 0
    gains = overlap_gain(query, database[np.array([[0, 1, 2]])])
    # DCG@1 = 1/2;  DCG@3 = 1/2 + (1/3)/log2(3) + 0 = 0.710310
    np.testing.assert_allclose(dcg_at(gains, [1, 3]), [[0.5, 0.5 + (1 / 3) / LOG2_3]])
    # database gains sorted: D=1, A=1/2, B=1/3, C=0, E=0
    ideal = ideal_gains(query, database, 3)
    np.testing.assert_allclose(ideal, [[1, 1 / 2, 1 / 3]])
    # IDCG@1 = 1; IDCG@3 = 1 + (1/2)/log2(3) + (1/3)/2 = 1.482131
    # nDCG@1 = 0.5; nDCG@3 = 0.710310 / 1.482131 = 0.479251
    np.testing.assert_allclose(
        ndcg_at(gains, ideal, [1, 3]),
        [[0.5, (0.5 + (1 / 3) / LOG2_3) / (1 + 0.5 / LOG2_3 + (1 / 3) / 2)]])


def test_ndcg_of_the_ideal_ranking_is_one_and_zero_without_any_gain():
    query, database = multi_label_case()
    gains = overlap_gain(query, database[np.array([[3, 0, 1]])])   # D, A, B: the best order
    np.testing.assert_allclose(ndcg_at(gains, ideal_gains(query, database, 3), [1, 2, 3]),
                               [[1, 1, 1]])
    nothing = np.zeros((1, 3), bool)  # a query without labels: IDCG = 0 -> nDCG = 0
    zero_gains = overlap_gain(nothing, database[np.array([[3, 0, 1]])])
    np.testing.assert_array_equal(
        ndcg_at(zero_gains, ideal_gains(nothing, database, 3), [3]), [[0.0]])


def test_ideal_gains_pad_with_zeros_past_the_database():
    query, database = multi_label_case()
    np.testing.assert_allclose(ideal_gains(query, database, 7),
                               [[1, 1 / 2, 1 / 3, 0, 0, 0, 0]])


def test_ndcg_requires_sorted_ideal():
    with pytest.raises(ValueError, match="non-increasing"):
        ndcg_at(np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]]), [2])


def random_multi_label(rng, n_rows, n_labels=5, density=0.3):
    return rng.random((n_rows, n_labels)) < density


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ideal_gains_and_counts_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    database = random_multi_label(rng, 60)
    queries = random_multi_label(rng, 9)
    every_item = np.broadcast_to(database, (9,) + database.shape)
    all_gains = overlap_gain(queries, every_item)                      # (q, n)
    np.testing.assert_allclose(ideal_gains(queries, database, 12),
                               -np.sort(-all_gains, axis=1)[:, :12])
    np.testing.assert_array_equal(count_relevant(queries, database),
                                  binary_relevance(queries, every_item).sum(axis=1))


@pytest.mark.parametrize("seed", [0, 1])
def test_leave_one_out_drops_the_query_itself(seed):
    rng = np.random.default_rng(seed)
    database = random_multi_label(rng, 40)
    query_indices = np.array([0, 5, 7, 39])
    queries = database[query_indices]
    for row, own in enumerate(query_indices):
        others = np.delete(database, own, axis=0)[None]
        gains = overlap_gain(queries[row:row + 1], others)[0]
        np.testing.assert_allclose(
            ideal_gains(queries, database, 10, query_indices=query_indices)[row],
            -np.sort(-gains)[:10])
        assert count_relevant(queries, database, query_indices=query_indices)[row] == \
            binary_relevance(queries[row:row + 1], others).sum()


def test_leave_one_out_ideal_by_hand():
    # three items all {0}; query = item 0: the other two give gains 1, 1, then nothing
    database = np.array([[1, 0], [1, 0], [1, 0]], dtype=bool)
    np.testing.assert_array_equal(
        ideal_gains(database[[0]], database, 4, query_indices=np.array([0])), [[1, 1, 0, 0]])
    # a database holding only the query leaves nothing to gain, nothing relevant
    alone = database[[0]]
    np.testing.assert_array_equal(
        ideal_gains(alone, alone, 2, query_indices=np.array([0])), [[0, 0]])
    assert count_relevant(alone, alone, query_indices=np.array([0]))[0] == 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ndcg_matches_scikit_learn_with_whole_database_as_y_true(seed):
    # sklearn's ndcg_score takes its ideal from y_true; giving it every database item's gain
    # (and a score that puts our ranking first) makes its IDCG the database-wide one we use.
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(seed)
    database = random_multi_label(rng, 50)
    queries = random_multi_label(rng, 8)
    depth = 10
    ranked = np.array([rng.permutation(50)[:depth] for _ in range(8)])
    gains = overlap_gain(queries, database[ranked])
    ours = ndcg_at(gains, ideal_gains(queries, database, depth), [1, 5, 10])

    all_gains = overlap_gain(queries, np.broadcast_to(database, (8,) + database.shape))
    scores = np.zeros((8, 50))
    np.put_along_axis(scores, ranked, np.arange(depth, 0, -1, dtype=float), axis=1)
    for column, k in enumerate([1, 5, 10]):
        assert ours[:, column].mean() == pytest.approx(
            metrics.ndcg_score(all_gains, scores, k=k), abs=1e-12)


# ---------------------------------------------------------------- purity

def test_purity_by_hand():
    clusters = np.array([0, 0, 0, 1, 1, 2])
    classes = np.array([0, 0, 1, 1, 1, 2])
    # cluster 0 holds classes {0,0,1}: majority 2; cluster 1 {1,1}: 2; cluster 2 {2}: 1
    # purity = (2 + 2 + 1) / 6 = 5/6
    assert cluster_purity(clusters, one_hot(classes)) == pytest.approx(5 / 6)


def test_purity_multi_label_counts_the_most_common_label():
    clusters = np.array([7, 7, 7, 3])
    labels = np.array([[1, 1], [1, 0], [0, 1], [0, 0]], dtype=bool)
    # cluster 7: label 0 on 2 members, label 1 on 2 -> 2; cluster 3: no label -> 0
    assert cluster_purity(clusters, labels) == pytest.approx(2 / 4)


@pytest.mark.parametrize("seed", [0, 1])
def test_purity_matches_contingency_matrix(seed):
    cluster_metrics = pytest.importorskip("sklearn.metrics.cluster")
    rng = np.random.default_rng(seed)
    classes, clusters = rng.integers(0, 4, 100), rng.integers(0, 6, 100) * 3
    table = cluster_metrics.contingency_matrix(classes, clusters)  # (classes, clusters)
    assert cluster_purity(clusters, one_hot(classes)) == pytest.approx(
        table.max(axis=0).sum() / 100)


# ---------------------------------------------------------------- IRMA error

REFERENCE = "1121-127-700-500"
# Default b = 10 everywhere cancels, so depth i weighs 1/i. Per-axis maxima:
#   4 characters: 1 + 1/2 + 1/3 + 1/4 = 25/12;   3 characters: 1 + 1/2 + 1/3 = 11/6


@pytest.mark.parametrize("compared, axis_errors, reason", [
    ("1121-127-700-500", [0, 0, 0, 0], "identical codes"),
    ("2121-127-700-500", [1, 0, 0, 0], "first technical character wrong: whole axis"),
    ("1121-127-800-500", [0, 0, 1, 0], "first anatomical character wrong: whole axis"),
    ("1122-127-700-500", [3 / 25, 0, 0, 0], "depth 4 only: (1/4) / (25/12)"),
    ("1221-127-700-500", [13 / 25, 0, 0, 0], "depth 2 on: (1/2+1/3+1/4) / (25/12)"),
    ("1211-127-700-500", [13 / 25, 0, 0, 0], "after a difference, equal chars count too"),
    ("1121-128-700-500", [0, (1 / 3) / (11 / 6), 0, 0], "depth 3 of 3: 2/11"),
    ("1121-1**-700-500", [0, (0.5 / 2 + 0.5 / 3) / (11 / 6), 0, 0],
     "'*' costs 0.5 from there on: 5/22"),
    ("1121-1*9-700-500", [0, (0.5 / 2 + 0.5 / 3) / (11 / 6), 0, 0],
     "after '*', a digit still costs 0.5 (ImageCLEF script)"),
    ("1121-127-7**-500", [0, 0, 0, 0], "'*' against the reference's '0' is free"),
    ("1121-127-700-5*1", [0, 0, 0, (0.5 / 3) / (11 / 6)],
     "'*' on '0' is free but what follows costs 0.5: 1/11"),
    ("9999-999-999-999", [1, 1, 1, 1], "everything wrong"),
])
def test_irma_axis_errors_by_hand(compared, axis_errors, reason):
    np.testing.assert_allclose(irma_axis_errors(REFERENCE, compared), axis_errors,
                               atol=1e-12, err_msg=reason)
    assert irma_error(REFERENCE, compared) == pytest.approx(np.mean(axis_errors))


def test_irma_first_character_wrong_on_one_axis_is_a_quarter():
    assert irma_error(REFERENCE, "1121-227-700-500") == pytest.approx(0.25)


def test_irma_deeper_difference_weighs_less():
    errors = [irma_error(REFERENCE, code) for code in
              ("2121-127-700-500", "1221-127-700-500", "1111-127-700-500", "1122-127-700-500")]
    assert errors == sorted(errors, reverse=True) and errors[-1] > 0


def test_irma_branching_table():
    # technical b = (2, 10, 10, 10): a wrong character at depth 2 onwards costs
    #   (1/20 + 1/30 + 1/40) / (1/2 + 1/20 + 1/30 + 1/40) = (13/120) / (73/120) = 13/73
    branching = np.full(13, 10.0)
    branching[0] = 2.0
    assert irma_axis_errors(REFERENCE, "1221-127-700-500", branching=branching)[0] == \
        pytest.approx(13 / 73)
    # a constant b cancels in the normalisation
    np.testing.assert_allclose(
        irma_axis_errors(REFERENCE, "1221-128-7a0-5*0", branching=np.full(13, 36.0)),
        irma_axis_errors(REFERENCE, "1221-128-7a0-5*0"))


def test_irma_per_code_branching_and_broadcasting():
    queries = np.array([[REFERENCE], ["1121-127-700-500"]])            # (2, 1)
    retrieved = np.array([["1121-127-700-500", "2121-127-700-500", "1122-127-700-500"],
                          ["1121-127-700-500", "1121-127-700-501", "1121-127-700-500"]])
    errors = irma_error(queries, retrieved)
    assert errors.shape == (2, 3)
    np.testing.assert_allclose(errors, [[0, 1 / 4, 3 / 100], [0, (2 / 11) / 4, 0]])
    per_code = np.broadcast_to(np.full(13, 10.0), (2, 3, 13))
    np.testing.assert_allclose(irma_error(queries, retrieved, branching=per_code), errors)


def imageclef_axis_error(reference, compared, branching):
    """The ImageCLEF rules written out as a loop over one axis."""
    wrong = unspecified = False
    error = maximum = 0.0
    for depth, (ref, cmp, b) in enumerate(zip(reference, compared, branching), start=1):
        weight = 1.0 / (b * depth)
        maximum += weight
        if ref == cmp and not wrong and not unspecified:
            pass
        elif ref == "0" and cmp == "*" and not wrong:
            unspecified = True
        elif (cmp == "*" and not wrong) or unspecified:
            error += 0.5 * weight
            unspecified = True
        else:
            wrong = True
            error += weight
    return error / maximum


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_irma_vectorised_matches_loop(seed):
    rng = np.random.default_rng(seed)
    alphabet = np.array(list("0120a"))  # few symbols, so that matches and '0's are common

    def random_code(with_stars):
        chars = rng.choice(alphabet, 13)
        if with_stars:
            chars = np.where(rng.random(13) < 0.2, "*", chars)
        text = "".join(chars)
        return f"{text[:4]}-{text[4:7]}-{text[7:10]}-{text[10:]}"

    references = [random_code(False) for _ in range(50)]
    compared = [random_code(True) for _ in range(50)]
    branching = rng.integers(2, 20, 13).astype(float)
    ours = irma_axis_errors(references, compared, branching=branching)
    bounds = [(0, 4), (4, 7), (7, 10), (10, 13)]
    for row, (ref, cmp) in enumerate(zip(references, compared)):
        ref_chars, cmp_chars = ref.replace("-", ""), cmp.replace("-", "")
        for axis, (start, stop) in enumerate(bounds):
            assert ours[row, axis] == pytest.approx(imageclef_axis_error(
                ref_chars[start:stop], cmp_chars[start:stop], branching[start:stop]))


@pytest.mark.parametrize("code, reason", [
    ("1121-127-700", "three axes"),
    ("1121127700500", "no dashes"),
    ("11211-27-700-500", "wrong axis lengths"),
    ("1121-127-700-5_0", "bad character"),
])
def test_irma_malformed_codes_are_rejected(code, reason):
    with pytest.raises(ValueError, match="malformed"):
        parse_irma_codes([code])


def test_irma_parsing_and_reference_checks():
    assert parse_irma_codes("1121-127-7A0-500").tolist()[8] == "a"  # case-insensitive
    with pytest.raises(ValueError, match="fully specified"):
        irma_error("1121-1**-700-500", REFERENCE)
    with pytest.raises(ValueError, match="branching"):
        irma_error(REFERENCE, REFERENCE, branching=np.zeros(13))


# ---------------------------------------------------------------- the table row

def test_evaluate_rankings_by_hand():
    queries, database = single_label_case()
    clusters = np.array([0, 0, 0, 1, 1, 1, 1])
    row = evaluate_rankings(queries, database, RANKED, cutoffs=[2, 5], ndcg_cutoffs=[5],
                            cluster_labels=clusters)
    # P@2: (1/2 + 0 + 0)/3 = 1/6;  P@5: (3/5 + 0 + 1/5)/3 = 4/15
    # R@2: (1/4 + 0 + 0)/3 = 1/12; R@5: (3/4 + 0 + 1/2)/3 = 5/12
    # mAP@2: (1 + 0 + 0)/3 = 1/3;  mAP@5: (29/36 + 0 + 1/5)/3 = 181/540
    # F1@5 = 2 (4/15)(5/12) / (4/15 + 5/12) = (2/9) / (41/60) = 40/123
    # nDCG@5 (one-hot gains are 0/1):
    #   q0 gains 1 0 1 1 0: DCG = 1 + 1/2 + 1/log2(5); ideal 1 1 1 1 0 -> IDCG = 1 + 1/log2 3
    #      + 1/2 + 1/log2 5
    #   q1: nothing of class 2 retrieved -> 0;  q2: DCG = 1/log2 6, IDCG = 1 + 1/log2 3
    # purity: cluster 0 = classes {0,1,0} -> 2; cluster 1 = {0,1,0,2} -> 2; (2+2)/7 = 4/7
    ndcg_q0 = (1 + 1 / 2 + 1 / math.log2(5)) / (1 + 1 / LOG2_3 + 1 / 2 + 1 / math.log2(5))
    ndcg_q2 = (1 / math.log2(6)) / (1 + 1 / LOG2_3)
    expected = {
        "P@2": 1 / 6, "R@2": 1 / 12, "F1@2": 2 * (1 / 6) * (1 / 12) / (1 / 6 + 1 / 12),
        "mAP@2": 1 / 3,
        "P@5": 4 / 15, "R@5": 5 / 12, "F1@5": 40 / 123, "mAP@5": 181 / 540,
        "nDCG@5": (ndcg_q0 + 0 + ndcg_q2) / 3,
        "purity": 4 / 7,
    }
    assert row.keys() == expected.keys()
    for key, value in expected.items():
        assert row[key] == pytest.approx(value, abs=1e-12), key


def test_evaluate_rankings_f1_reproduces_the_papers_column():
    # The paper's Table 1 F1 is the harmonic mean of the averaged P and R:
    # DDicCIR 84.53 / 83.24 -> 83.88; DenseNet121 71.23 / 69.17 -> 70.18.
    for precision, recall, f1 in [(84.53, 83.24, 83.88), (71.23, 69.17, 70.18)]:
        assert 2 * precision * recall / (precision + recall) == pytest.approx(f1, abs=0.005)


def test_evaluate_rankings_leave_one_out_by_hand():
    database = one_hot(np.array([0, 0, 1, 0]))
    # query = database item 0 (class 0), ranking items 1, 2, 3 -> rel 1 0 1
    # R = 3 class-0 items minus the query itself = 2: R@3 = 2/2 = 1
    # P@3 = 2/3; AP@3 = (1 + 2/3)/2 = 5/6
    # nDCG@3: DCG = 1 + 0 + 1/2; ideal without the query: 1 1 0 -> IDCG = 1 + 1/log2 3
    row = evaluate_rankings(database[[0]], database, np.array([[1, 2, 3]]), cutoffs=[3],
                            ndcg_cutoffs=[3], query_indices=np.array([0]))
    assert row["R@3"] == pytest.approx(1.0)
    assert row["P@3"] == pytest.approx(2 / 3)
    assert row["mAP@3"] == pytest.approx(5 / 6)
    assert row["nDCG@3"] == pytest.approx(1.5 / (1 + 1 / LOG2_3))
    with pytest.raises(ValueError, match="its own query"):
        evaluate_rankings(database[[0]], database, np.array([[0, 1, 2]]), cutoffs=[3],
                          query_indices=np.array([0]))
    with pytest.raises(ValueError, match="differ"):
        evaluate_rankings(database[[2]], database, np.array([[1, 2, 3]]), cutoffs=[3],
                          query_indices=np.array([0]))


@pytest.mark.parametrize("ranked, match", [
    (np.array([[0, 0, 1]]), "twice"),
    (np.array([[0, 1, 9]]), r"\[0, 4\)"),
    (np.array([[0.0, 1.0, 2.0]]), "integer"),
    (np.array([[0, 1]]), "cutoffs"),
])
def test_evaluate_rankings_checks_the_ranking(ranked, match):
    database = one_hot(np.array([0, 0, 1, 0]))
    with pytest.raises(ValueError, match=match):
        evaluate_rankings(database[[0]], database, ranked, cutoffs=[3], ndcg_cutoffs=[])


def test_evaluate_rankings_default_cutoffs():
    rng = np.random.default_rng(0)
    database = random_multi_label(rng, 80)
    queries = random_multi_label(rng, 6)
    ranked = np.array([rng.permutation(80)[:40] for _ in range(6)])
    row = evaluate_rankings(queries, database, ranked)
    assert [key for key in row if key.startswith("mAP@")] == [
        f"mAP@{n}" for n in (5, 10, 15, 20, 25, 30, 35, 40)]
    assert {"nDCG@5", "nDCG@10"} <= row.keys() and "purity" not in row
    assert all(0.0 <= value <= 1.0 for value in row.values())


# --------------------------------------------------------------------------------------
# Excluded items (e.g. the query's own study): not candidates, not counted

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_excluded_items_match_brute_force_on_the_remaining_database(seed):
    rng = np.random.default_rng(seed)
    database = random_multi_label(rng, 50)
    queries = random_multi_label(rng, 7)
    pair_query = rng.integers(0, 7, 40)
    pair_item = rng.integers(0, 50, 40)        # duplicates included: a pair counts once
    excluded = (pair_query, pair_item)
    ideal = ideal_gains(queries, database, 12, excluded=excluded)
    relevant = count_relevant(queries, database, excluded=excluded)
    for row in range(7):
        others = np.delete(database, np.unique(pair_item[pair_query == row]), axis=0)[None]
        gains = overlap_gain(queries[row:row + 1], others)[0]
        np.testing.assert_allclose(ideal[row], np.pad(-np.sort(-gains), (0, 12))[:12])
        assert relevant[row] == binary_relevance(queries[row:row + 1], others).sum()


def test_evaluate_rankings_with_excluded_items_by_hand():
    database = one_hot(np.array([0, 0, 1, 0, 0]))
    # query of class 0 whose own study holds items 0 and 1: the candidates are 2, 3, 4;
    # ranking 2, 3, 4 -> rel 0 1 1; R = 2 (items 3, 4), R@3 = 1; P@3 = 2/3
    # AP@3 = (1/2 + 2/3) / 2; nDCG@3 = (1/log2 3 + 1/2) / (1 + 1/log2 3)
    excluded = (np.array([0, 0]), np.array([0, 1]))
    row = evaluate_rankings(database[[0]], database, np.array([[2, 3, 4]]), cutoffs=[3],
                            ndcg_cutoffs=[3], excluded=excluded)
    assert row["R@3"] == pytest.approx(1.0)
    assert row["P@3"] == pytest.approx(2 / 3)
    assert row["mAP@3"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert row["nDCG@3"] == pytest.approx((1 / LOG2_3 + 1 / 2) / (1 + 1 / LOG2_3))
    with pytest.raises(ValueError, match="excluded for its query"):
        evaluate_rankings(database[[0]], database, np.array([[1, 3, 4]]), cutoffs=[3],
                          excluded=excluded)
    with pytest.raises(ValueError, match="excluded rows must lie"):
        evaluate_rankings(database[[0]], database, np.array([[2, 3, 4]]), cutoffs=[3],
                          excluded=(np.array([1]), np.array([0])))
