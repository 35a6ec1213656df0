"""learner.credit against hand-computed cases (arithmetic written out) and properties."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from learner.credit import (
    CREDIT_METHODS,
    aa_shaping_sum,
    credits,
    group_baseline_advantages,
    pair_by_game,
    returns_to_go,
)

# ---------------------------------------------------------------- hand-computed cases


def test_returns_to_go_hand_computed() -> None:
    rewards = np.array([[3.0, 0.0, 5.0], [1.0, 1.0, 3.0]])
    # game 0, discount 0.5: G2 = 5; G1 = 0 + 0.5*5 = 2.5; G0 = 3 + 0.5*2.5 = 4.25
    # game 1:               G2 = 3; G1 = 1 + 0.5*3 = 2.5; G0 = 1 + 0.5*2.5 = 2.25
    expected = np.array([[4.25, 2.5, 5.0], [2.25, 2.5, 3.0]])
    np.testing.assert_allclose(returns_to_go(rewards, 0.5), expected)
    # reward normaliser c = 5 divides every return: 4.25/5 = 0.85, 2.5/5 = 0.5, ...
    expected_c5 = np.array([[0.85, 0.5, 1.0], [0.45, 0.5, 0.6]])
    np.testing.assert_allclose(returns_to_go(rewards, 0.5, normaliser=5.0), expected_c5)


def test_returns_to_go_ipd_discount_09() -> None:
    # Two rounds of mutual cooperation (3, 3), gd 0.9, c 5: G1 = 3/5 = 0.6; G0 = 0.6 + 0.9*0.6 = 1.14
    np.testing.assert_allclose(returns_to_go([[3.0, 3.0]], 0.9, normaliser=5.0), [[1.14, 0.6]])


def test_group_baseline_hand_computed() -> None:
    returns = np.array(
        [
            [4.0, 2.0, 1.0],  # a  } group 1
            [2.0, 2.0, 3.0],  # b  }
            [0.0, 5.0, 2.0],  # c  }
            [7.0, 7.0, 7.0],  # d    group 9, alone: no baseline
        ]
    )
    # a: mean(b, c) = [1, 3.5, 2.5] -> [4-1, 2-3.5, 1-2.5] = [3, -1.5, -1.5]
    # b: mean(a, c) = [2, 3.5, 1.5] -> [0, -1.5, 1.5]
    # c: mean(a, b) = [3, 2, 2]     -> [-3, 3, 0]
    # d: [7, 7, 7]
    expected = np.array([[3.0, -1.5, -1.5], [0.0, -1.5, 1.5], [-3.0, 3.0, 0.0], [7.0, 7.0, 7.0]])
    np.testing.assert_allclose(group_baseline_advantages(returns, np.array([1, 1, 1, 9])), expected)


def test_group_baseline_pair_and_string_labels() -> None:
    # group of two: each is compared with the other one: [1-3, 2-5] and [3-1, 5-2]
    out = group_baseline_advantages([[1.0, 2.0], [3.0, 5.0]], np.array(["g", "g"]))
    np.testing.assert_allclose(out, [[-2.0, -3.0], [2.0, 3.0]])


def test_credits_hand_computed() -> None:
    A1 = np.array([[1.0, 2.0, -1.0], [0.0, -2.0, 4.0]])
    A2 = np.array([[0.5, -1.0, 2.0], [1.0, 1.0, 1.0]])
    beta, g = 0.5, 0.9
    # naive: C = A1
    np.testing.assert_allclose(credits("naive", A1, A2, beta, g), A1)
    # sum: C = A1 + A2
    np.testing.assert_allclose(credits("sum", A1, A2, beta, g), [[1.5, 1.0, 1.0], [1.0, -1.0, 5.0]])
    # aa, game 0: S = [0, 0.9*(0+1) = 0.9, 0.9*(0.9+2) = 2.61]; beta*g = 0.45
    #   C0 = 1 + 0.45*0*0.5 = 1;  C1 = 2 + 0.45*0.9*(-1) = 1.595;  C2 = -1 + 0.45*2.61*2 = 1.349
    # aa, game 1: S = [0, 0.9*(0+0) = 0, 0.9*(0-2) = -1.8]
    #   C0 = 0;  C1 = -2 + 0;  C2 = 4 + 0.45*(-1.8)*1 = 3.19
    np.testing.assert_allclose(aa_shaping_sum(A1, g), [[0.0, 0.9, 2.61], [0.0, 0.0, -1.8]])
    np.testing.assert_allclose(credits("aa", A1, A2, beta, g), [[1.0, 1.595, 1.349], [0.0, -2.0, 3.19]])


def test_credits_unknown_method_names_valid_ones() -> None:
    A = np.zeros((1, 2))
    with pytest.raises(ValueError, match="naive, sum, aa"):
        credits("lola", A, A, 0.5, 0.9)


def test_credits_shape_mismatch() -> None:
    with pytest.raises(ValueError):
        credits("sum", np.zeros((2, 3)), np.zeros((3, 2)), 0.5, 0.9)


def test_pair_by_game() -> None:
    # rows: (game 7, seat 1), (game 3, seat 0), (game 7, seat 0), (game 3, seat 1)
    partner = pair_by_game(np.array([7, 3, 7, 3]), np.array([1, 0, 0, 1]))
    np.testing.assert_array_equal(partner, [2, 3, 0, 1])
    A = np.array([[10.0], [20.0], [30.0], [40.0]])
    np.testing.assert_array_equal(A[partner], [[30.0], [40.0], [10.0], [20.0]])


@pytest.mark.parametrize(
    ("games", "seats"),
    [([1, 1, 1], [0, 1, 0]), ([1, 2], [0, 1]), ([1, 1], [0, 0]), ([1, 1, 1, 2], [0, 1, 0, 1])],
)
def test_pair_by_game_rejects_bad_pairs(games: list[int], seats: list[int]) -> None:
    with pytest.raises(ValueError):
        pair_by_game(np.array(games), np.array(seats))


# ---------------------------------------------------------------- properties

finite = st.floats(-10.0, 10.0, allow_nan=False, allow_infinity=False)


@st.composite
def batch(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    n = draw(st.integers(1, 12))
    t = draw(st.integers(1, 6))
    values = draw(arrays(np.float64, (n, t), elements=finite))
    groups = draw(arrays(np.int64, (n,), elements=st.integers(0, 3)))
    return values, groups


@st.composite
def advantage_pair(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    n = draw(st.integers(1, 6))
    t = draw(st.integers(1, 8))
    return (
        draw(arrays(np.float64, (n, t), elements=finite)),
        draw(arrays(np.float64, (n, t), elements=finite)),
    )


@settings(max_examples=200, deadline=None)
@given(batch())
def test_leave_one_out_sums_to_zero_within_groups(b: tuple[np.ndarray, np.ndarray]) -> None:
    returns, groups = b
    adv = group_baseline_advantages(returns, groups)
    for g in np.unique(groups):
        rows = groups == g
        if rows.sum() > 1:
            np.testing.assert_allclose(adv[rows].sum(axis=0), 0.0, atol=1e-9)
        else:
            np.testing.assert_array_equal(adv[rows], returns[rows])


@settings(max_examples=200, deadline=None)
@given(batch())
def test_leave_one_out_matches_loop_reference(b: tuple[np.ndarray, np.ndarray]) -> None:
    returns, groups = b
    expected = returns.copy()
    for n in range(len(returns)):
        others = [m for m in range(len(returns)) if m != n and groups[m] == groups[n]]
        if others:
            expected[n] = returns[n] - returns[others].mean(axis=0)
    np.testing.assert_allclose(group_baseline_advantages(returns, groups), expected, atol=1e-9)


@settings(max_examples=100, deadline=None)
@given(batch(), finite)
def test_leave_one_out_ignores_a_shared_shift(b: tuple[np.ndarray, np.ndarray], shift: float) -> None:
    returns, _ = b
    one_group = np.zeros(len(returns))
    if len(returns) > 1:
        np.testing.assert_allclose(
            group_baseline_advantages(returns + shift, one_group),
            group_baseline_advantages(returns, one_group),
            atol=1e-9,
        )


@settings(max_examples=100, deadline=None)
@given(batch(), st.floats(0.0, 1.0), st.floats(0.5, 100.0))
def test_returns_closed_form(b: tuple[np.ndarray, np.ndarray], gd: float, c: float) -> None:
    rewards, _ = b
    T = rewards.shape[1]
    expected = np.array(
        [[sum(gd ** (u - t) * row[u] for u in range(t, T)) / c for t in range(T)] for row in rewards]
    )
    np.testing.assert_allclose(returns_to_go(rewards, gd, normaliser=c), expected, atol=1e-9)


@settings(max_examples=100, deadline=None)
@given(advantage_pair(), st.floats(0.0, 3.0), st.floats(0.0, 1.0))
def test_naive_is_own_advantage_and_aa_beta0_is_naive(
    adv: tuple[np.ndarray, np.ndarray], beta: float, g: float
) -> None:
    A1, A2 = adv
    np.testing.assert_array_equal(credits("naive", A1, A2, beta, g), A1)
    np.testing.assert_array_equal(credits("aa", A1, A2, 0.0, g), A1)
    np.testing.assert_allclose(credits("sum", A1, A2, beta, g), A1 + A2)


@settings(max_examples=200, deadline=None)
@given(advantage_pair(), st.floats(0.0, 3.0), st.floats(0.0, 1.0))
def test_aa_closed_form(adv: tuple[np.ndarray, np.ndarray], beta: float, g: float) -> None:
    # C_t - A1_t = beta * g * (sum_{k<t} g^(t-k) A1_k) * A2_t   (spec section 4)
    A1, A2 = adv
    T = A1.shape[1]
    S = np.array([[sum(g ** (t - k) * row[k] for k in range(t)) for t in range(T)] for row in A1])
    np.testing.assert_allclose(aa_shaping_sum(A1, g), S, atol=1e-9)
    np.testing.assert_allclose(credits("aa", A1, A2, beta, g), A1 + beta * g * S * A2, atol=1e-9)


@settings(max_examples=50, deadline=None)
@given(advantage_pair(), st.floats(0.0, 1.0))
def test_aa_zero_opponent_advantage_is_naive(adv: tuple[np.ndarray, np.ndarray], g: float) -> None:
    A1, _ = adv
    np.testing.assert_allclose(credits("aa", A1, np.zeros_like(A1), 0.5, g), A1)


def test_methods_listed() -> None:
    assert CREDIT_METHODS == ("naive", "sum", "aa")
