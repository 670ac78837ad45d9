"""Paired comparisons: the estimate and SE against hand-computed values, the wording against the thresholds."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vae_priors.experiments.evaluation.comparisons import (
    PairedDifference,
    Question,
    evidence,
    findings,
    paired_difference,
    sentence,
)


def test_paired_difference_is_the_mean_and_standard_error_of_the_per_point_differences():
    diff = paired_difference(np.array([1.0, 2.0, 3.0, 4.0]), np.zeros(4))
    assert diff.mean == 2.5 and diff.n == 4
    assert diff.se == pytest.approx(math.sqrt(5 / 3) / 2)  # sd of 1..4 with ddof=1 is sqrt(5/3)


def test_pairing_removes_the_shared_point_to_point_variation():
    rng = np.random.default_rng(0)
    difficulty = rng.normal(0, 20, size=4000)  # shared by both variants, as hard digits are
    noise = rng.normal(0, 1, size=4000)
    diff = paired_difference(difficulty + 0.1 + noise, difficulty)
    assert diff.se == pytest.approx(1 / math.sqrt(4000), rel=0.05)  # only the noise is left in the SE
    unpaired = math.hypot(*(np.std(v, ddof=1) / math.sqrt(4000) for v in (difficulty + 0.1 + noise, difficulty)))
    assert unpaired > 20 * diff.se
    assert evidence(diff) == "clear difference"


@pytest.mark.parametrize(("z", "kind"), [(5.0, "clear difference"), (-3.0, "clear difference"),
                                         (2.5, "suggestive difference"), (1.9, "no detectable difference at this size"),
                                         (0.0, "no detectable difference at this size")])
def test_evidence_wording_follows_the_z_score(z, kind):
    assert evidence(PairedDifference(mean=z * 0.1, se=0.1, n=100)) == kind


def test_sentence_names_the_leader_and_never_claims_a_difference_it_cannot_see():
    assert sentence("a", "b", PairedDifference(-1.0, 0.1, 50)).startswith("b is ahead of a by 1.00 ± 0.10")
    quiet = sentence("a", "b", PairedDifference(0.1, 0.1, 50))
    assert "no detectable difference" in quiet and "ahead" not in quiet


def test_findings_answers_only_questions_whose_two_variants_were_scored():
    scores = {"vae": np.array([-1.0, -2.0, -3.0]), "vae-vamp": np.array([-0.5, -1.4, -2.6])}
    table = findings(scores, questions=(Question("prior?", "vae-vamp", "vae"), Question("guide?", "vae", "x")))
    assert list(table.question) == ["prior?"]
    assert table.difference[0] == pytest.approx(0.5)


def test_mismatched_or_non_finite_scores_are_refused():
    with pytest.raises(ValueError, match="same points"):
        paired_difference(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="NaN"):
        paired_difference(np.array([0.0, np.nan]), np.zeros(2))
