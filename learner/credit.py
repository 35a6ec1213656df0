"""Returns, group-relative baselines and credits: section 4 of the method spec, in numpy.

Notation (method spec, section 4): seat label l, game n in group g, round t = 0..T-1, reward r,
reward normaliser c, discount gd, AA weight beta and AA discount g (``gamma``).

1. Return-to-go:              G_t(n) = sum_{u>=t} gd^(u-t) * r_u(n) / c
2. Leave-one-out baseline:    A_t(n) = G_t(n) - mean_{m in group(n), m != n} G_t(m)
                              (a group of size 1 gets no baseline: A_t(n) = G_t(n))
3. Opponent advantage A2:     the same computation on the opponent seat's rewards, matched by game.
4. Credits C_t:
   naive:                     C_t = A1_t
   sum of rewards:            C_t = A1_t + A2_t
   Advantage Alignment (aa):  S_0 = 0;  S_t = g * (S_{t-1} + A1_{t-1});  C_t = A1_t + beta * g * S_t * A2_t
                              (S_t = sum_{k<t} g^(t-k) A1_k)

Arrays are [n_games, n_rounds]: one row per trajectory (a seat of a game), one column per round.
The learner broadcasts C_t to every generated token of round t (step 5 of the spec).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

CREDIT_METHODS: tuple[str, ...] = ("naive", "sum", "aa")

FloatArray = NDArray[np.float64]


def returns_to_go(rewards: ArrayLike, discount: float, normaliser: float = 1.0) -> FloatArray:
    """G_t = sum_{u>=t} discount^(u-t) * r_u / normaliser, per row.

    rewards: [n_games, n_rounds]. Returns an array of the same shape (float64).
    Computed backwards: G_{T-1} = r_{T-1} / c;  G_t = r_t / c + discount * G_{t+1}.
    """
    r = np.asarray(rewards, dtype=np.float64) / normaliser
    if r.ndim != 2:
        raise ValueError(f"rewards must be [n_games, n_rounds], got shape {r.shape}")
    G = np.zeros_like(r)
    running = np.zeros(r.shape[0], dtype=np.float64)
    for t in range(r.shape[1] - 1, -1, -1):
        running = r[:, t] + discount * running
        G[:, t] = running
    return G


def group_baseline_advantages(returns: ArrayLike, group_ids: ArrayLike) -> FloatArray:
    """A_t(n) = G_t(n) - mean_{m in group(n), m != n} G_t(m), at the same round index t.

    returns: [n_games, n_rounds]; group_ids: [n_games] (any hashable-by-numpy labels).
    A group of size 1 gets no baseline (A = G). Within a group of size k > 1 the advantages of a
    round sum to zero: with S the group sum, sum_n A_t(n) = S - (k*S - S) / (k - 1) = 0.
    """
    G = np.asarray(returns, dtype=np.float64)
    if G.ndim != 2:
        raise ValueError(f"returns must be [n_games, n_rounds], got shape {G.shape}")
    ids = np.asarray(group_ids)
    if ids.shape != (G.shape[0],):
        raise ValueError(f"group_ids must have shape ({G.shape[0]},), got {ids.shape}")
    _, group = np.unique(ids, return_inverse=True)
    group = group.reshape(-1)
    n_groups = int(group.max()) + 1 if group.size else 0

    size = np.bincount(group, minlength=n_groups).astype(np.float64)  # k_g
    total = np.zeros((n_groups, G.shape[1]), dtype=np.float64)  # sum_{m in g} G_t(m)
    np.add.at(total, group, G)

    k = size[group][:, None]  # size of each game's group
    others = np.maximum(k - 1.0, 1.0)
    loo_mean = (total[group] - G) / others  # mean over m != n
    baseline = np.where(k > 1.0, loo_mean, 0.0)
    return G - baseline


def aa_shaping_sum(own_adv: ArrayLike, gamma: float) -> FloatArray:
    """S_0 = 0;  S_t = gamma * (S_{t-1} + A1_{t-1})   (= sum_{k<t} gamma^(t-k) A1_k)."""
    A1 = np.asarray(own_adv, dtype=np.float64)
    S = np.zeros_like(A1)
    for t in range(1, A1.shape[1]):
        S[:, t] = gamma * (S[:, t - 1] + A1[:, t - 1])
    return S


def credits(method: str, own_adv: ArrayLike, opp_adv: ArrayLike, beta: float, gamma: float) -> FloatArray:
    """Per-round credit C_t for the trained seat.

    own_adv = A1 (this seat), opp_adv = A2 (the opponent seat of the same game), both [n_games, n_rounds].
      naive: C_t = A1_t
      sum:   C_t = A1_t + A2_t
      aa:    S_0 = 0;  S_t = gamma * (S_{t-1} + A1_{t-1});  C_t = A1_t + beta * gamma * S_t * A2_t
    beta and gamma are used by "aa" only.
    """
    if method not in CREDIT_METHODS:
        raise ValueError(f"unknown credit method {method!r}; valid: {', '.join(CREDIT_METHODS)}")
    A1 = np.asarray(own_adv, dtype=np.float64)
    A2 = np.asarray(opp_adv, dtype=np.float64)
    if A1.shape != A2.shape or A1.ndim != 2:
        raise ValueError(f"own_adv and opp_adv must both be [n_games, n_rounds], got {A1.shape}, {A2.shape}")
    if method == "naive":
        return A1.copy()
    if method == "sum":
        return A1 + A2
    S = aa_shaping_sum(A1, gamma)
    return A1 + beta * gamma * S * A2


def pair_by_game(game_ids: ArrayLike, seats: ArrayLike) -> NDArray[np.int64]:
    """Index of the opponent row for each row: the other seat of the same game.

    game_ids, seats: [n_rows]; every game must have exactly two rows with different seats.
    Use as  A2 = A[pair_by_game(game_ids, seats)].
    """
    games = np.asarray(game_ids)
    seat = np.asarray(seats)
    if games.shape != seat.shape or games.ndim != 1:
        raise ValueError("game_ids and seats must be 1-D arrays of the same length")
    order = np.lexsort((seat, games))  # rows sorted by (game, seat)
    g_sorted = games[order]
    if (
        order.size % 2
        or not np.all(g_sorted[0::2] == g_sorted[1::2])
        or (order.size > 2 and np.any(g_sorted[2::2] == g_sorted[1:-1:2]))
    ):
        raise ValueError("every game must have exactly two rows (one per seat)")
    if np.any(seat[order[0::2]] == seat[order[1::2]]):
        raise ValueError("the two rows of a game must have different seats")
    partner = np.empty(order.size, dtype=np.int64)
    partner[order[0::2]] = order[1::2]
    partner[order[1::2]] = order[0::2]
    return partner
