"""learner.batch: Arrow trajectories -> credits -> token tensors (credits on the right tokens, pairing
by game id, trainable rows only, bucketing with little padding, rank sharding, schema errors).

IPD-like trajectories with the real tokenizer come from tests/support.py (`ipd_game`, `ipd_table`).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from support import RULES, ipd_game, ipd_table

from actors.trajectories import summary, to_batch
from learner.batch import (
    BatchError,
    CreditSpec,
    assign_shards,
    build_iteration,
    build_rank_iteration,
    plan_micro_batches,
    reward_matrix,
    row_credits,
)
from learner.credit import credits, group_baseline_advantages, returns_to_go

# ---------------------------------------------------------------------------------------- credits


def test_row_credits_pair_by_game_id_in_any_row_order(tokenizer) -> None:
    table = ipd_table(tokenizer, n_games=4, seed=3, group_size=2)
    perm = np.array([5, 0, 7, 2, 1, 6, 3, 4])  # shuffle rows: seats and games interleaved
    shuffled = table.take(pa.array(perm))
    spec = CreditSpec("aa", discount=0.9, normaliser=5.0, beta=0.5, gamma=0.9)

    # by hand on the original order: rows (game g, seat s) at index 2g + s
    R = reward_matrix(table)
    G = returns_to_go(R, 0.9, 5.0)
    groups = np.array([(g // 2) * 2 + s for g in range(4) for s in (0, 1)])  # (group, seat) labels
    A = group_baseline_advantages(G, groups)
    partner = np.array([1, 0, 3, 2, 5, 4, 7, 6])
    expected = credits("aa", A, A[partner], 0.5, 0.9)

    np.testing.assert_allclose(row_credits(table, spec), expected)
    np.testing.assert_allclose(row_credits(shuffled, spec), expected[perm])


def test_baseline_groups_split_learner_and_frozen_rows_of_one_seat(tokenizer) -> None:
    # one batch-wide group; the learner sits at seat g mod 2, a frozen opponent at the other seat
    rng = np.random.default_rng(7)
    rows = []
    for g in range(6):
        learner_seat = g % 2
        rows += ipd_game(tokenizer, g, 0, rng, trainable=(learner_seat == 0, learner_seat == 1), guided=False)
    table = pa.Table.from_batches([to_batch(rows)])
    A = row_credits(table, CreditSpec("naive", 0.9, 5.0))  # naive: C = A1
    G = returns_to_go(reward_matrix(table), 0.9, 5.0)
    trainable = np.asarray(table.column("trainable"))
    seat = np.asarray(table.column("seat"))
    for s in (0, 1):
        for t in (True, False):  # each (seat, role) cell is its own leave-one-out group of 3
            idx = np.flatnonzero((seat == s) & (trainable == t))
            assert len(idx) == 3
            np.testing.assert_allclose(A[idx], group_baseline_advantages(G[idx], np.zeros(3)))


def test_reward_matrix_pads_variable_horizon(tokenizer) -> None:
    rng = np.random.default_rng(0)
    rows = ipd_game(tokenizer, 0, 0, rng, n_rounds=2) + ipd_game(tokenizer, 1, 1, rng, n_rounds=4)
    R = reward_matrix(pa.Table.from_batches([to_batch(rows)]))
    assert R.shape == (4, 4)
    assert (R[:2, 2:] == 0).all()


# ---------------------------------------------------------------------------------------- tokens


def test_credits_land_on_generated_tokens_of_their_round(tokenizer) -> None:
    table = ipd_table(tokenizer, n_games=3, seed=1, group_size=1, guided=False)
    spec = CreditSpec("sum", discount=0.9, normaliser=5.0)
    C = row_credits(table, spec)
    it = build_iteration(table, spec, max_tokens=10**6)
    (mb,) = it.micro_batches
    # logit_pos p-1 predicts the token at p: shifting by one recovers the targets
    assert np.array_equal(mb.input_ids.reshape(-1)[mb.logit_pos + 1].numpy(), mb.target_ids.numpy())

    token_round = table.column("token_round").to_pylist()
    token_ids = table.column("token_ids").to_pylist()
    n_gen = sum(sum(r >= 0 for r in row) for row in token_round)
    assert it.n_tok == mb.n_targets == n_gen

    # every generated token carries C[row, round]; prompt tokens are never targets
    L = mb.input_ids.shape[1]
    got: dict[tuple[int, int], float] = {}
    for pos, credit in zip(mb.logit_pos.tolist(), mb.credit.tolist(), strict=True):
        got[divmod(pos + 1, L)] = credit
    for b in range(mb.input_ids.shape[0]):
        ids = mb.input_ids[b, : int(mb.attention_mask[b].sum())].tolist()
        row = next(i for i, r in enumerate(token_ids) if r == ids)
        for p, rnd in enumerate(token_round[row]):
            if rnd >= 0:
                assert got[(b, p)] == pytest.approx(C[row, rnd], abs=1e-6)
            else:
                assert (b, p) not in got


def test_only_trainable_rows_become_sequences_but_all_feed_a2(tokenizer) -> None:
    rng = np.random.default_rng(2)
    rows = [r for g in range(4) for r in ipd_game(tokenizer, g, 0, rng, trainable=(True, False), guided=False)]
    table = pa.Table.from_batches([to_batch(rows)])
    spec = CreditSpec("sum", discount=0.9, normaliser=5.0)
    it = build_iteration(table, spec, max_tokens=10**6)
    assert it.n_rows == 4
    assert sum(mb.input_ids.shape[0] for mb in it.micro_batches) == 4
    # the scripted seat's advantage still enters the learner's credit (sum: C = A1 + A2)
    naive = build_iteration(table, CreditSpec("naive", 0.9, 5.0), max_tokens=10**6)
    assert not np.allclose(it.micro_batches[0].credit.numpy(), naive.micro_batches[0].credit.numpy())


def test_guided_tokens_get_constraints(tokenizer) -> None:
    from learner.constrain import Constrainer

    table = ipd_table(tokenizer, n_games=2, seed=0)
    con = Constrainer(tokenizer, len(tokenizer), stop_token_ids=[tokenizer.eos_token_id])
    it = build_iteration(table, CreditSpec(), constrainer=con)
    mb = it.micro_batches[0]
    assert (mb.constraint >= 0).all()  # every generated token here is guided
    assert it.n_guided_tokens == it.n_tok
    assert mb.bitmasks.shape[0] <= 4  # `<`, A|B, `>`, eos: a handful of distinct masks
    with pytest.raises(BatchError, match="Constrainer"):
        build_iteration(table, CreditSpec())


def test_missing_regex_for_guided_decision_is_a_clear_error(tokenizer) -> None:
    from learner.constrain import Constrainer

    rng = np.random.default_rng(0)
    rows = ipd_game(tokenizer, 0, 0, rng)
    rows[0].decision_regex[1] = ""
    batch = to_batch(rows)
    con = Constrainer(tokenizer, len(tokenizer))
    with pytest.raises(BatchError, match="decision_regex"):
        build_iteration(batch, CreditSpec(), constrainer=con)


def test_unguided_batch_needs_no_constrainer(tokenizer) -> None:
    table = ipd_table(tokenizer, n_games=2, guided=False)
    it = build_iteration(table, CreditSpec())
    assert (it.micro_batches[0].constraint == -1).all()


# ---------------------------------------------------------------------------------------- errors


def test_schema_errors_are_clear(tokenizer) -> None:
    table = ipd_table(tokenizer, n_games=2)
    with pytest.raises(BatchError, match="rewards"):
        build_iteration(table.drop_columns(["rewards"]), CreditSpec())
    with pytest.raises(BatchError, match="game_id"):
        build_iteration(table.slice(0, 3), CreditSpec())  # game 1 lacks a seat


def test_decision_count_must_match_guided_flags(tokenizer) -> None:
    rng = np.random.default_rng(0)
    rows = ipd_game(tokenizer, 0, 0, rng, guided=False)
    rows[0].guided.pop()
    rows[0].decision_regex.pop()
    with pytest.raises(BatchError, match="decisions"):
        build_iteration(to_batch(rows), CreditSpec())


# ---------------------------------------------------------------------------------------- bucketing


def test_bucketing_keeps_padding_under_10_percent(tokenizer) -> None:
    rng = np.random.default_rng(0)
    rows = []
    for g in range(32):  # mixed lengths: rules padded with 0..250 extra tokens' worth of words
        extra = " ".join(["cooperate"] * int(rng.integers(0, 250)))
        rows += ipd_game(tokenizer, g, g // 8, rng, n_rounds=int(rng.integers(2, 6)), rules=RULES + extra,
                         guided=False)
    table = pa.Table.from_batches([to_batch(rows)])
    lengths = np.diff(table.column("token_ids").combine_chunks().offsets.to_numpy())
    assert lengths.max() > 1.8 * lengths.min()
    it = build_iteration(table, CreditSpec(), max_tokens=2048)
    assert it.n_micro > 3
    assert it.padding_fraction < 0.10, it.padding_fraction
    print(f"mixed-length batch: {it.n_rows} rows, {lengths.min()}-{lengths.max()} tokens, "
          f"{it.n_micro} micro-batches, padding {it.padding_fraction:.1%}")
    real = sum(mb.n_real_tokens for mb in it.micro_batches)
    assert real == it.real_tokens == lengths.sum()
    assert all(mb.n_padded_tokens <= 2048 for mb in it.micro_batches)


def test_plan_micro_batches_respects_budget() -> None:
    lengths = np.array([100, 400, 390, 120, 250, 260, 255])
    groups = plan_micro_batches(lengths, 800)
    assert sorted(np.concatenate(groups).tolist()) == list(range(7))
    assert all(len(g) * lengths[g].max() <= 800 for g in groups)
    assert plan_micro_batches(np.array([5000]), 800)[0].tolist() == [0]  # an overlong row goes alone


def test_plan_micro_batches_trades_padding_for_passes() -> None:
    lengths = np.array([320, 416, 330, 400])
    # one pass: 4 x 416 = 1664 padded (+1 overhead); two: 2 x 416 + 2 x 330 = 1492 (+2 overheads)
    split = plan_micro_batches(lengths, 4096, overhead_tokens=64)
    assert [sorted(g.tolist()) for g in split] == [[1, 3], [0, 2]]
    assert len(plan_micro_batches(lengths, 4096, overhead_tokens=1000)) == 1


def test_ranks_share_rows_and_run_equal_micro_batch_counts(tokenizer) -> None:
    table = ipd_table(tokenizer, n_games=5, seed=4, guided=False)
    spec = CreditSpec()
    full = build_iteration(table, spec, max_tokens=700)
    parts = [build_iteration(table, spec, max_tokens=700, rank=r, world_size=2) for r in (0, 1)]
    assert parts[0].n_micro == parts[1].n_micro == len(parts[0].micro_batches) == len(parts[1].micro_batches)
    assert parts[0].n_tok == parts[1].n_tok == full.n_tok  # N_tok is global
    targets = sorted(c for p in parts for mb in p.micro_batches for c in mb.credit.tolist())
    assert targets == pytest.approx(sorted(c for mb in full.micro_batches for c in mb.credit.tolist()))
    assert sum(mb.n_real_tokens for p in parts for mb in p.micro_batches) == full.real_tokens


def _shards(table: pa.Table, group_size: int) -> list[pa.Table]:
    """The table as the rollout returns it: one batch per baseline group of `group_size` games."""
    return [table.slice(i, 2 * group_size) for i in range(0, table.num_rows, 2 * group_size)]


def _targets(it) -> list[tuple[int, float, float]]:
    """Every target of an iteration batch, independent of how rows were grouped into passes."""
    return sorted((int(t), round(float(c), 6), round(float(lp), 6)) for mb in it.micro_batches
                  for t, c, lp in zip(mb.target_ids.tolist(), mb.credit.tolist(), mb.engine_logprobs.tolist(),
                                      strict=True))


def test_assign_shards_balances_tokens_and_is_deterministic() -> None:
    assert assign_shards([100, 90, 50, 40, 10], 2) == [[0, 3, 4], [1, 2]]  # 150 and 140 tokens
    assert assign_shards([5], 3) == [[0], [], []]  # fewer batches than ranks: a rank gets none
    assert assign_shards([7, 7, 7], 1) == [[0, 1, 2]]


@pytest.mark.parametrize("world_size", [2, 3])
def test_each_rank_fetches_only_its_own_batches_and_ranks_together_equal_the_whole(tokenizer, world_size) -> None:
    """Credits from the summaries alone (the baseline spans batches: AA with a batch-wide group is
    not tested here; groups of 2 games within a batch are), each batch fetched by exactly one rank,
    and the ranks' targets together are the one-rank build's, with global N_tok and equal passes."""
    table = ipd_table(tokenizer, n_games=8, seed=5, group_size=2, guided=False)
    spec = CreditSpec("aa", discount=0.9, normaliser=5.0, beta=0.5, gamma=0.9)
    batches = _shards(table, 2)
    summaries = [summary(b) for b in batches]
    full = build_iteration(batches, spec, max_tokens=700)
    fetched: list[list[int]] = []

    def fetch(idx: list[int]) -> list[pa.Table]:
        fetched.append(list(idx))
        return [batches[i] for i in idx]

    parts = [build_rank_iteration(summaries, fetch, spec, rank=r, world_size=world_size, max_tokens=700)
             for r in range(world_size)]
    assert sorted(i for f in fetched for i in f) == list(range(len(batches)))  # each batch once, by one rank
    assert len({p.n_micro for p in parts}) == 1 and all(len(p.micro_batches) == p.n_micro for p in parts)
    assert {p.n_tok for p in parts} == {full.n_tok} and {p.real_tokens for p in parts} == {full.real_tokens}
    assert {p.n_rows for p in parts} == {full.n_rows}
    assert sorted(t for p in parts for t in _targets(p)) == _targets(full)
    assert sum(p.local_tok for p in parts) == full.n_tok
    local_sum = sum(p.credit_mean * p.local_tok for p in parts)
    assert local_sum / full.n_tok == pytest.approx(full.credit_mean, abs=1e-9)  # what the learner all-reduces


def test_a_batch_group_spanning_batches_gets_the_same_credits_from_summaries(tokenizer) -> None:
    """A batch-wide baseline (IPD `baseline: batch`: one group for every game) spans the batches; the
    credits that reach a rank are still those of the whole batch, because they come from the
    summaries of every batch, not from the rank's own rows."""
    table = ipd_table(tokenizer, n_games=6, seed=6, group_size=6, guided=False)  # one group of 6 games
    spec = CreditSpec("naive", discount=0.9, normaliser=5.0)
    batches = [table.slice(i, 4) for i in range(0, table.num_rows, 4)]  # 3 batches of 2 games
    full = build_iteration(batches, spec)
    parts = [build_rank_iteration([summary(b) for b in batches], lambda idx: [batches[i] for i in idx], spec,
                                  rank=r, world_size=2) for r in (0, 1)]
    assert sorted(t for p in parts for t in _targets(p)) == _targets(full)
    per_batch = sorted(t for b in batches for t in _targets(build_iteration(b, spec)))
    assert per_batch != _targets(full)  # a baseline within each batch alone gives other credits


def test_a_summary_that_does_not_match_its_batch_is_a_clear_error(tokenizer) -> None:
    table = ipd_table(tokenizer, n_games=4, seed=7, group_size=2, guided=False)
    batches = _shards(table, 2)
    summaries = [summary(b) for b in batches]
    swapped = [batches[1], batches[0]]  # the refs and the summaries out of step
    with pytest.raises(BatchError, match="games and seats differ"):
        for r in (0, 1):
            build_rank_iteration(summaries, lambda idx: [swapped[i] for i in idx], CreditSpec(), rank=r, world_size=2)
