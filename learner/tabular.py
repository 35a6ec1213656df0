"""The science check: a 5-parameter memory-1 IPD policy trained with the credits of ``learner.credit``.

Method spec, section 1: with 128 games x 10 rounds per iteration (discount 0.9, reward normaliser 5,
Adam lr 0.1) a memory-1 policy learns
  naive -> always defect;  sum of rewards -> always cooperate (exploitable);
  AA (beta 0.5, gamma 0.9) -> cooperates and retaliates (P(C|start), P(C|CC) ~ 1, P(C|CD) ~ 0).
The project's credit code must reproduce this before any LLM is trained on it.

Policy: one logit per state s in (start, CC, CD, DC, DD), the state read from the agent's own view
as (my last action, opponent's last action); pi(C | s) = sigmoid(theta_s).

Update (spec section 4, with a Bernoulli-logit policy in place of the LLM's tokens):
  G = returns_to_go(r, gd, c);  A = group_baseline_advantages(G, group)  (whole batch of a seat = a group)
  C = credits(method, A1, A2, beta, g)
  J(theta) = (1/N_dec) sum_{games, rounds} C_t * log pi(a_t | s_t)
  dJ/dtheta_s = (1/N_dec) sum_{t: s_t = s} C_t * (a_t - pi(C | s_t)),   a_t = 1 for C, 0 for D
  one Adam step of ascent per iteration.

Self-play (no buffer): both seats play the current policy and both seats' trajectories are trained;
each seat's A2 is the other seat's advantage in the same game.
Agent buffer (spec section 5): every 10 iterations (it > 0) the current logits are frozen into the
buffer; up to 28 snapshots are resident per iteration (uniform subsample when more); per game the
learner takes seat ``game mod 2`` and the other seat is, with probability 0.5, a uniformly drawn
resident snapshot, otherwise a frozen copy of the current policy. Only the learner seat is trained;
the opponent's advantages still feed A2. (ours) The group of the baseline is the seat's role
(all learner trajectories form one group, all opponent trajectories another).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from learner.credit import CREDIT_METHODS, credits, group_baseline_advantages, returns_to_go

STATES: tuple[str, ...] = ("start", "CC", "CD", "DC", "DD")
# PAYOFF[my action, opponent action] with 1 = C, 0 = D: CC 3, CD 0, DC 5, DD 1.
PAYOFF: NDArray[np.float64] = np.array([[1.0, 5.0], [0.0, 3.0]])

# Reactive policy: each state's class (0 start, 1 the opponent played C, 2 the opponent played D).
REACTIVE_OF_STATE: NDArray[np.int64] = np.array([0, 1, 2, 1, 2])

SNAPSHOT_EVERY = 10
MAX_RESIDENT = 28
BUFFER_OPPONENT_PROB = 0.5


def sigmoid(x: NDArray[np.float64]) -> NDArray[np.float64]:
    return 1.0 / (1.0 + np.exp(-x))


def state_index(my_last: NDArray[np.int64], opp_last: NDArray[np.int64]) -> NDArray[np.int64]:
    """(my last, opponent last) -> 1..4 for CC, CD, DC, DD (index 0 is the start state)."""
    return 1 + 2 * (1 - my_last) + (1 - opp_last)


@dataclass
class Rollout:
    """Trajectories of both seats of N games: arrays [N, rounds] per seat (seat 0 = index 0)."""

    states: NDArray[np.int64]  # [2, N, T]
    actions: NDArray[np.int64]  # [2, N, T], 1 = C
    p_coop: NDArray[np.float64]  # [2, N, T], pi(C | s_t) of the acting policy
    rewards: NDArray[np.float64]  # [2, N, T]


def play_ipd(logits: NDArray[np.float64], rounds: int, rng: np.random.Generator) -> Rollout:
    """Play N games of the IPD at once. logits: [2, N, 5], the policy of each seat in each game."""
    _, n, _ = logits.shape
    rows = np.arange(n)
    states = np.zeros((2, n, rounds), dtype=np.int64)
    actions = np.zeros((2, n, rounds), dtype=np.int64)
    p_coop = np.zeros((2, n, rounds), dtype=np.float64)
    s = np.zeros((2, n), dtype=np.int64)  # start state
    for t in range(rounds):
        p = sigmoid(np.stack([logits[0, rows, s[0]], logits[1, rows, s[1]]]))
        a = (rng.random((2, n)) < p).astype(np.int64)
        states[:, :, t], actions[:, :, t], p_coop[:, :, t] = s, a, p
        s = np.stack([state_index(a[0], a[1]), state_index(a[1], a[0])])
    rewards = np.stack([PAYOFF[actions[0], actions[1]], PAYOFF[actions[1], actions[0]]])
    return Rollout(states, actions, p_coop, rewards)


class Adam:
    """Adam (Kingma & Ba) for one parameter vector; ``step`` ascends the given gradient."""

    def __init__(self, size: int, lr: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> None:
        self.lr, self.b1, self.b2, self.eps = lr, b1, b2, eps
        self.m = np.zeros(size)
        self.v = np.zeros(size)
        self.t = 0

    def step(self, theta: NDArray[np.float64], grad: NDArray[np.float64]) -> NDArray[np.float64]:
        self.t += 1
        self.m = self.b1 * self.m + (1 - self.b1) * grad
        self.v = self.b2 * self.v + (1 - self.b2) * grad**2
        m_hat = self.m / (1 - self.b1**self.t)
        v_hat = self.v / (1 - self.b2**self.t)
        return theta + self.lr * m_hat / (np.sqrt(v_hat) + self.eps)


def policy_gradient(
    states: NDArray[np.int64],
    actions: NDArray[np.int64],
    p_coop: NDArray[np.float64],
    credit: NDArray[np.float64],
) -> NDArray[np.float64]:
    """dJ/dtheta_s = (1/N_dec) sum_{t: s_t = s} C_t * (a_t - pi(C|s_t)) over all given decisions."""
    grad = np.zeros(len(STATES))
    np.add.at(grad, states.ravel(), (credit * (actions - p_coop)).ravel())
    return grad / states.size


@dataclass
class TabularResult:
    method: str
    buffer: bool
    seed: int
    logits: NDArray[np.float64]  # [5] final
    history: NDArray[np.float64]  # [iterations, 5]: P(C | state) after each update
    mean_reward: NDArray[np.float64]  # [iterations]: mean per-round reward of the trained seat(s)
    p_c: dict[str, float] = field(default_factory=dict)  # final P(C | state)


def buffer_opponents(
    theta: NDArray[np.float64], snapshots: list[NDArray[np.float64]], games: int, rng: np.random.Generator
) -> NDArray[np.float64]:
    """Opponent logits per game [N, 5] (spec section 5): with probability 0.5 a snapshot drawn
    uniformly from the resident ones (up to 28, a uniform subsample when more exist), otherwise a
    frozen copy of the current policy. With no snapshot yet every opponent is the current policy."""
    current = np.broadcast_to(theta, (games, theta.size))
    if not snapshots:
        return current.copy()
    resident = np.stack(snapshots)
    if len(resident) > MAX_RESIDENT:
        resident = resident[rng.choice(len(resident), MAX_RESIDENT, replace=False)]
    use_snapshot = rng.random(games) < BUFFER_OPPONENT_PROB
    drawn = resident[rng.integers(len(resident), size=games)]
    return np.where(use_snapshot[:, None], drawn, current)


def train_tabular(
    method: str,
    iterations: int = 400,
    games: int = 128,
    beta: float = 0.5,
    gamma: float = 0.9,
    buffer: bool = False,
    seed: int = 0,
    lr: float = 0.1,
    rounds: int = 10,
    discount: float = 0.9,
    normaliser: float = 5.0,
    init_logits: NDArray[np.float64] | None = None,
    reactive: bool = False,
) -> TabularResult:
    """Train the memory-1 IPD policy with credit ``method`` ("naive", "sum", "aa").

    Self-play when ``buffer`` is False (both seats trained), else the agent buffer of spec section 5.
    ``reactive``: the policy sees only the opponent's last action, as the LLM's IPD prompt shows it
    ("Last round, the other agent played X"): CC and DC share one logit, CD and DD another.
    """
    if method not in CREDIT_METHODS:
        raise ValueError(f"unknown credit method {method!r}; valid: {', '.join(CREDIT_METHODS)}")
    rng = np.random.default_rng(seed)
    theta = np.zeros(len(STATES)) if init_logits is None else np.asarray(init_logits, dtype=np.float64).copy()
    if reactive and not np.allclose(theta[[1, 2]], theta[[3, 4]]):  # CC == DC, CD == DD
        raise ValueError("a reactive policy needs init_logits with CC == DC and CD == DD")
    adam = Adam(theta.size, lr)
    snapshots: list[NDArray[np.float64]] = []
    history = np.zeros((iterations, len(STATES)))
    mean_reward = np.zeros(iterations)
    games_idx = np.arange(games)
    one_group = np.zeros(games, dtype=np.int64)  # IPD: the whole batch of a seat label is one group
    learner_seat = games_idx % 2  # buffer mode: the learner takes seat game mod 2
    trained = [0] if buffer else [0, 1]  # rows below: 0 = learner (buffer) / seat 0 (self-play)

    for it in range(iterations):
        # 1. Seats. Self-play: both seats are the current policy. Buffer: learner vs opponent.
        current = np.broadcast_to(theta, (games, theta.size))
        if buffer:
            if it > 0 and it % SNAPSHOT_EVERY == 0:
                snapshots.append(theta.copy())
            opponent = buffer_opponents(theta, snapshots, games, rng)
            is_learner = [(learner_seat == seat)[:, None] for seat in (0, 1)]
            seat_logits = np.stack([np.where(is_learner[seat], current, opponent) for seat in (0, 1)])
        else:
            seat_logits = np.stack([current, current])

        # 2. Rollout of all games at once; buffer mode reorders the seats to (learner, opponent).
        ro = play_ipd(seat_logits, rounds, rng)
        arrays = (ro.states, ro.actions, ro.p_coop, ro.rewards)
        if buffer:
            role_seat = np.stack([learner_seat, 1 - learner_seat])  # [2, N]
            arrays = tuple(x[role_seat, games_idx] for x in arrays)
        states, actions, p_coop, rewards = arrays

        # 3. Spec section 4: return-to-go, leave-one-out advantage, credit (A2 = the other row).
        G = [returns_to_go(rewards[i], discount, normaliser) for i in (0, 1)]
        A = [group_baseline_advantages(G[i], one_group) for i in (0, 1)]
        C = np.stack([credits(method, A[i], A[1 - i], beta, gamma) for i in trained])

        # 4. Policy-gradient ascent on (1/N_dec) sum C_t log pi(a_t | s_t): one Adam step.
        grad = policy_gradient(states[trained], actions[trained], p_coop[trained], C)
        if reactive:
            grad = np.bincount(REACTIVE_OF_STATE, weights=grad)[REACTIVE_OF_STATE]
        theta = adam.step(theta, grad)

        history[it] = sigmoid(theta)
        mean_reward[it] = rewards[trained].mean()

    return TabularResult(
        method=method,
        buffer=buffer,
        seed=seed,
        logits=theta,
        history=history,
        mean_reward=mean_reward,
        p_c={name: float(p) for name, p in zip(STATES, sigmoid(theta), strict=True)},
    )
