"""Paired comparisons of variants over the same test points, and the findings they support.

Two variants A and B scored on the same N test points give per-point differences d_n = s_A(n) - s_B(n)
(s = the importance-sampled log p(x_n), or log p(y_n|x_n) for conditional pairs). The estimate is

    mean(d) = 1/N sum_n d_n,     SE = sd(d) / sqrt(N)

-- ArviZ's ``dse`` on one point's scale. Both variants share the point-to-point variation (a hard digit is hard
for every model), so this SE is far smaller than the two variants' own error bars combined: comparing two
separate error bars hides differences the data show clearly.

The wording of a finding follows |mean(d)| / SE (a z-score over N test points; the test points are the sample,
the trained networks are one draw each, so seed-to-seed variation is NOT in this SE):

    >= 3   "clear difference"                 2-3   "suggestive difference"
    <  2   "no detectable difference at this size"
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

CLEAR_Z = 3.0
SUGGESTIVE_Z = 2.0


@dataclass(frozen=True)
class Question:
    """One question the collection exists to settle, answered by comparing ``variant`` with ``baseline``."""

    question: str
    variant: str
    baseline: str


# The questions a run can answer from its held-out per-point scores; a question is answered where a run trained
# both of its variants.
QUESTIONS = (
    Question("Are mu(x), sigma(x) input-dependent? (amortized q(z|x) vs a constant q(z))", "vae",
             "vae-constant-guide"),
    Question("Amortized or per-point guide? (q(z|x) vs per-point (mu_n, sigma_n))", "vae", "vae-local-guide"),
    Question("N(0, I) or a mixture prior? (VampPrior)", "vae-vamp", "vae"),
    Question("N(0, I) or a mixture prior? (exemplar prior)", "vae-exemplar", "vae"),
    Question("VampPrior or exemplar prior?", "vae-exemplar", "vae-vamp"),
    Question("p(z|x) or p(z)? (CVAE with a prior network vs N(0, I))", "cvae", "cvae-independent-prior"),
    Question("GSNN or CVAE? (z ~ p(z|x) in training, no recognition net)", "gsnn", "cvae"),
    Question("Hybrid or CVAE? (alpha CVAE + (1 - alpha) GSNN)", "cvae-hybrid", "cvae"),
)


@dataclass(frozen=True)
class PairedDifference:
    mean: float
    se: float
    n: int

    @property
    def z(self) -> float:
        if self.se > 0:
            return self.mean / self.se
        return math.copysign(math.inf, self.mean) if self.mean != 0 else 0.0


def standard_error(values: np.ndarray) -> float:
    """Standard error of the mean of per-point ``values`` (NaN for fewer than two points)."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.std(ddof=1) / math.sqrt(values.size)) if values.size > 1 else math.nan


def paired_difference(a: np.ndarray, b: np.ndarray) -> PairedDifference:
    """Mean and standard error of ``a - b`` over points (the same points, in the same order, in both)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired scores must be two 1-D arrays over the same points, got {a.shape} and {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("paired scores contain NaN or infinite values")
    d = a - b
    return PairedDifference(float(d.mean()), standard_error(d), int(d.size))


def evidence(diff: PairedDifference) -> str:
    """How strong the evidence for a difference is, by |mean| / SE (see the module docstring)."""
    z = abs(diff.z)
    if math.isnan(z):
        return "not enough points"
    if z >= CLEAR_Z:
        return "clear difference"
    if z >= SUGGESTIVE_Z:
        return "suggestive difference"
    return "no detectable difference at this size"


def _num(value: float) -> str:
    """Two decimals, or two significant digits for values below 0.1 (a 0.004-nat difference is not 0.00)."""
    return f"{value:.2f}" if abs(value) >= 0.1 or value == 0 else f"{value:.2g}"


def sentence(variant: str, baseline: str, diff: PairedDifference, unit: str = "nats per test point") -> str:
    """A finding worded by its evidence, e.g. "vae-vamp is ahead of vae by 3.45 ± 0.11 nats per test point (31 SE):
    a clear difference"."""
    kind = evidence(diff)
    amount = f"{_num(abs(diff.mean))} ± {_num(diff.se)} {unit} ({abs(diff.z):.1f} SE over {diff.n} points)"
    if kind.startswith("no detectable") or kind == "not enough points":
        sign = "+" if diff.mean >= 0 else "-"
        return (f"{variant} and {baseline}: {kind} ({variant} - {baseline} = {sign}{_num(abs(diff.mean))} ± "
                f"{_num(diff.se)} {unit})")
    leader, other = (variant, baseline) if diff.mean > 0 else (baseline, variant)
    return f"{leader} is ahead of {other} by {amount}: a {kind}"


def findings(scores: Mapping[str, np.ndarray], questions: tuple[Question, ...] = QUESTIONS,
             measure: str = "test log-likelihood (IS)") -> pd.DataFrame:
    """One row per question whose two variants both have per-point ``scores`` (higher = better).

    Columns: question, variant, baseline, measure, n_points, difference (variant - baseline), se, z, evidence,
    finding (the sentence).
    """
    rows = []
    for q in questions:
        if q.variant not in scores or q.baseline not in scores:
            continue
        diff = paired_difference(scores[q.variant], scores[q.baseline])
        rows.append({"question": q.question, "variant": q.variant, "baseline": q.baseline, "measure": measure,
                     "n_points": diff.n, "difference": diff.mean, "se": diff.se, "z": diff.z,
                     "evidence": evidence(diff), "finding": sentence(q.variant, q.baseline, diff)})
    columns = ["question", "variant", "baseline", "measure", "n_points", "difference", "se", "z", "evidence",
               "finding"]
    return pd.DataFrame(rows, columns=columns)
