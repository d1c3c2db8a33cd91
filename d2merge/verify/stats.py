"""Exact tests on paired counts: McNemar, flips against rounding's, the paired gap interval.

Pure arithmetic (no scipy, no torch): the numbers verify's merge-gap and top-1 checks judge by.
"""

from __future__ import annotations

import math
from fractions import Fraction


def binomial_tail(k: int, n: int) -> float:
    """P(X >= k) for X ~ Binomial(n, 1/2), computed exactly (no scipy needed)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    return float(Fraction(sum(math.comb(n, i) for i in range(k, n + 1)), 2**n))


def mcnemar_exact(right_to_wrong: int, wrong_to_right: int) -> float:
    """Exact McNemar test: two-sided binomial p of the discordant pairs splitting this unevenly."""
    discordant = right_to_wrong + wrong_to_right
    if discordant == 0:
        return 1.0
    return min(1.0, 2.0 * binomial_tail(max(right_to_wrong, wrong_to_right), discordant))


def flips_vs_rounding(flips: int, rounding_flips: int) -> float:
    """One-sided p that ``flips`` exceeds ``rounding_flips`` by chance when both come at the same rate.

    Two counts of rare events on the same items: given their sum, the first is Binomial(sum, 1/2)
    when the rates are equal (the conditional test for two Poisson rates).
    """
    return binomial_tail(flips, flips + rounding_flips)


def paired_gap_interval(right_to_wrong: int, wrong_to_right: int, examples: int,
                        z: float = 1.959963984540054) -> tuple[float, float]:
    """95% interval of the paired accuracy difference, in pp (Agresti & Min 2005: add 1/2 to each cell).

    The plain Wald interval collapses to [0, 0] when nothing flipped; the added halves keep it
    honest about what a finite eval set can show.
    """
    b, c, n = right_to_wrong + 0.5, wrong_to_right + 0.5, examples + 2.0
    diff = (c - b) / n
    se = math.sqrt(max((b + c) - (c - b) ** 2 / n, 0.0)) / n
    return 100.0 * max(-1.0, diff - z * se), 100.0 * min(1.0, diff + z * se)
