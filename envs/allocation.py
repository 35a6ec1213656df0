"""Proportional allocation, shared by Split No-Comm (per item) and Trust-and-Split (coins)."""

from __future__ import annotations

UNITS = 10


def allocate(claim_a: int, claim_b: int, units: int = UNITS) -> tuple[float, float]:
    """Units each agent receives: denom = max(units, a + b); agent i gets units * claim_i / denom.

    Claims that fit (a + b <= units) are granted as made; otherwise the units are split in proportion.
    """
    denom = max(units, claim_a + claim_b)
    return units * claim_a / denom, units * claim_b / denom
