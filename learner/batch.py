"""Trajectory batches (Arrow) -> credits -> token tensors in length-bucketed micro-batches.

Steps (method spec, section 4), all vectorised over rows/tokens with numpy (Python loops run over
rows or guided decisions, never over tokens):

1. Concatenate the iteration's tables and validate them against ``actors.trajectories.SCHEMA``.
2. Per-row credits for *every* row (scripted/API/frozen seats included, they feed A2):
     R [n_rows, T]  rewards per round (zero-padded when horizons differ)
     G = returns_to_go(R, gd, c)
     A = group_baseline_advantages(G, (group_id, seat, trainable))   leave-one-out within group and seat
         label; (ours) `trainable` splits the learner's rows from frozen opponents' should a group
         mix roles in one seat (buffer games with one batch-wide group); otherwise it changes nothing
     A2 = A[partner]  with partner = the other seat of the same game_id
     C = credits(method, A, A2, beta, gamma)                  [n_rows, T]
3. Training sequences are the rows with ``trainable``. Every generated token of round t
   (token_round = t >= 0) gets C_t; prompt tokens (token_round = -1) are context only.
   The target at sequence position p is predicted by the logits at p - 1.
4. Guided decisions (``guided`` is one bool per decision; a decision is a maximal run of generated
   tokens of one round) get per-token allowed-token masks from :class:`learner.constrain.Constrainer`,
   using the decision's regex from the ``decision_regex`` column (one string per decision, aligned
   with ``guided``, "" when unguided). With ``guided_logprob="full"`` (the authors' choice) no masks
   are built: guided tokens are scored under the full vocabulary like free ones.
5. Length bucketing: rows sorted by length (longest first) are cut into micro-batches of at most
   ``max_tokens`` padded tokens (rows x longest row), the cuts chosen to minimise padding plus a
   per-pass overhead (``plan_micro_batches``); micro-batches are dealt to ranks so that every
   rank runs the same number of forward/backward passes (ZeRO-2/3 reduce inside each backward):
   a rank with fewer gets empty (dummy) micro-batches.
6. N_tok = generated tokens of the whole iteration (all ranks): the loss normaliser, so gradient
   accumulation over micro-batches and ranks sums to the full-batch loss.

With more than one rank, ``build_rank_iteration`` does the same from the batches' *summaries*
(``actors.trajectories.summary``: rewards, seats, groups, token counts, no token columns) plus only
this rank's own batches: credits of every row come from the summaries (they need rewards only),
whole batches (a baseline group each) are dealt to ranks by training tokens (``assign_shards``),
and each rank fetches and tokenises only its own. Every rank plans every rank's micro-batches
from the summaries' lengths, so all agree on N_tok and on the number of passes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import numpy as np
import pyarrow as pa
import torch

from actors.trajectories import SchemaError, concat, concat_summaries, list_offsets, list_values, validate
from learner.constrain import UNCONSTRAINED, Constrainer
from learner.credit import credits, group_baseline_advantages, pair_by_game, returns_to_go

GUIDED_LOGPROB = ("constrained", "full")
DECISION_REGEX = "decision_regex"  # list<string> per row: the regex of each decision, aligned with `guided`


class BatchError(ValueError):
    """A trajectory batch cannot be turned into training tensors (the message says why)."""


@dataclass(frozen=True)
class CreditSpec:
    """How per-round credits are computed (method spec, section 4)."""

    method: str = "aa"  # naive | sum | aa
    discount: float = 0.9  # gd
    normaliser: float = 1.0  # c (IPD 5, others 100)
    beta: float = 0.5  # AA beta
    gamma: float = 0.9  # AA gamma (g)


@dataclass
class MicroBatch:
    """One forward/backward pass. B rows right-padded to length L; n targets (generated tokens)."""

    input_ids: torch.Tensor  # [B, L] int64, right-padded with pad_id
    attention_mask: torch.Tensor  # [B, L] int64, 1 on real tokens (positions are 0..len-1)
    logit_pos: torch.Tensor  # [n] int64, flat index b*L + p - 1 of the logits that predict target n
    target_ids: torch.Tensor  # [n] int64, the generated token
    engine_logprobs: torch.Tensor  # [n] float32, the engine's sampling log-prob of it
    credit: torch.Tensor  # [n] float32, C_t of its round
    temperature: torch.Tensor  # [n] float32, sampling temperature of its row
    token_version: torch.Tensor  # [n] int32, adapter version that generated it
    constraint: torch.Tensor  # [n] int64, row of `bitmasks` (guided tokens) or -1 (unconstrained)
    bitmasks: torch.Tensor  # [n_masks, ceil(V/32)] int32, xgrammar-packed allowed-token masks

    @property
    def n_targets(self) -> int:
        return int(self.target_ids.numel())

    @property
    def n_real_tokens(self) -> int:
        return int(self.attention_mask.sum())

    @property
    def n_padded_tokens(self) -> int:
        return int(self.input_ids.numel())

    def to(self, device: torch.device | str) -> MicroBatch:
        return MicroBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    @classmethod
    def dummy(cls, pad_id: int, words: int) -> MicroBatch:
        """A one-token pass with no targets: keeps ranks in step (its loss and gradient are 0)."""
        empty_f, empty_l = torch.zeros(0, dtype=torch.float32), torch.zeros(0, dtype=torch.int64)
        return cls(
            input_ids=torch.full((1, 1), pad_id, dtype=torch.int64),
            attention_mask=torch.ones((1, 1), dtype=torch.int64),
            logit_pos=empty_l,
            target_ids=empty_l,
            engine_logprobs=empty_f,
            credit=empty_f,
            temperature=empty_f,
            token_version=torch.zeros(0, dtype=torch.int32),
            constraint=empty_l,
            bitmasks=torch.zeros((0, words), dtype=torch.int32),
        )


@dataclass
class IterationBatch:
    """This rank's micro-batches plus iteration-wide (all ranks) counts."""

    micro_batches: list[MicroBatch]
    n_tok: int  # generated tokens of the whole iteration: the loss normaliser N_tok
    n_rows: int  # training sequences (trainable rows), all ranks
    n_micro: int  # micro-batches per rank (equal on every rank, dummies included)
    real_tokens: int  # prompt + generated tokens of training sequences, all ranks
    padded_tokens: int  # B x L summed over all (non-dummy) micro-batches, all ranks
    n_guided_tokens: int  # generated tokens of guided decisions, all ranks
    credit_mean: float  # mean C over generated tokens, all ranks
    credit_abs_mean: float
    # build_rank_iteration: n_guided_tokens and the credit means are of this rank's rows only, over
    # its `local_tok` generated tokens (the learner all-reduces them); None when they are global
    local_tok: int | None = None

    @property
    def padding_fraction(self) -> float:
        return 1.0 - self.real_tokens / self.padded_tokens if self.padded_tokens else 0.0


# ------------------------------------------------------------------------------------ credits


def reward_matrix(table: pa.Table) -> np.ndarray:
    """rewards [n_rows, T], T = the longest horizon; shorter rows are zero-padded at the end."""
    offsets = list_offsets(table.column("rewards"))
    values = list_values(table.column("rewards")).astype(np.float64)
    n_rounds = np.diff(offsets)
    T = int(n_rounds.max()) if n_rounds.size else 0
    R = np.zeros((len(n_rounds), T), dtype=np.float64)
    row = np.repeat(np.arange(len(n_rounds)), n_rounds)
    R[row, np.arange(values.size) - offsets[row]] = values
    return R


def row_credits(table: pa.Table, spec: CreditSpec) -> np.ndarray:
    """C [n_rows, T] for every row: returns -> (group, seat, role) baseline -> opponent by game -> credits."""
    seat = np.asarray(table.column("seat"), dtype=np.int64)
    group = np.asarray(table.column("group_id"), dtype=np.int64)
    game = np.asarray(table.column("game_id"), dtype=np.int64)
    role = np.asarray(table.column("trainable"), dtype=np.int64)
    G = returns_to_go(reward_matrix(table), spec.discount, spec.normaliser)
    _, label = np.unique(np.stack([group, seat, role], axis=1), axis=0, return_inverse=True)
    A = group_baseline_advantages(G, label.reshape(-1))
    try:
        partner = pair_by_game(game, seat)
    except ValueError as e:
        raise BatchError(f"cannot pair the two seats of each game by game_id: {e}") from e
    return credits(spec.method, A, A[partner], spec.beta, spec.gamma)


# ------------------------------------------------------------------------------------ tokens


@dataclass
class _Tokens:
    """Flat token arrays of the training sequences (trainable rows), in row order."""

    offsets: np.ndarray  # [R + 1]
    ids: np.ndarray
    round: np.ndarray
    logprob: np.ndarray
    version: np.ndarray
    credit: np.ndarray  # C_t on generated tokens, 0 on prompt tokens
    temperature: np.ndarray  # [R]
    decision_start: np.ndarray  # [D] flat index of each decision's first token, row order
    decision_len: np.ndarray  # [D]
    guided: np.ndarray  # [D] bool
    regex: list[str]  # [D] ("" when unguided or unknown)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def generated(self) -> np.ndarray:
        return self.round >= 0


def _tokens(table: pa.Table, C: np.ndarray) -> _Tokens:
    trainable = np.asarray(table.column("trainable"), dtype=bool)
    rows = np.flatnonzero(trainable)
    sub = table.filter(pa.array(trainable))
    offsets = list_offsets(sub.column("token_ids"))
    ids = list_values(sub.column("token_ids")).astype(np.int64)
    rnd = list_values(sub.column("token_round")).astype(np.int64)
    n_rows, n = len(rows), ids.size
    lengths = np.diff(offsets)
    row_of = np.repeat(np.arange(n_rows), lengths)
    gen = rnd >= 0

    row_start = np.zeros(n, dtype=bool)
    row_start[offsets[:-1][lengths > 0]] = True
    if (gen & row_start).any():
        bad = int(row_of[np.flatnonzero(gen & row_start)[0]])
        raise BatchError(f"trainable row {int(rows[bad])} starts with a generated token (no context)")
    empty = np.flatnonzero(lengths == 0)
    if empty.size:
        raise BatchError(f"trainable row {int(rows[empty[0]])} has no tokens (scripted seats must be trainable=False)")

    credit = np.zeros(n, dtype=np.float64)
    if C.shape[1]:
        credit[gen] = C[rows[row_of[gen]], rnd[gen]]

    # decisions: maximal runs of generated tokens of one round within a row
    prev_gen = np.r_[False, gen[:-1]] & ~row_start
    same_round = np.r_[False, rnd[1:] == rnd[:-1]]
    start = gen & ~(prev_gen & same_round)
    decision_start = np.flatnonzero(start)
    decision_id = np.cumsum(start) - 1
    decision_len = np.bincount(decision_id[gen], minlength=decision_start.size)

    g_off = list_offsets(sub.column("guided"))
    guided = list_values(sub.column("guided")).astype(bool)
    per_row = np.bincount(row_of[start], minlength=n_rows)
    if not np.array_equal(per_row, np.diff(g_off)):
        bad = int(np.flatnonzero(per_row != np.diff(g_off))[0])
        raise BatchError(
            f"trainable row {int(rows[bad])}: {per_row[bad]} decisions (runs of generated tokens of one "
            f"round) but {np.diff(g_off)[bad]} `guided` flags; decisions must be separated by prompt tokens"
        )
    regex = [str(s) for s in sub.column(DECISION_REGEX).combine_chunks().flatten().to_pylist()]

    temperature = np.asarray(sub.column("temperature"), dtype=np.float32)
    if (temperature <= 0).any():
        raise BatchError("trainable rows need a sampling temperature > 0")
    return _Tokens(
        offsets=offsets,
        ids=ids,
        round=rnd,
        logprob=list_values(sub.column("logprobs")).astype(np.float32),
        version=list_values(sub.column("token_version")).astype(np.int32),
        credit=credit,
        temperature=temperature,
        decision_start=decision_start,
        decision_len=decision_len,
        guided=guided,
        regex=regex,
    )


# ------------------------------------------------------------------------------------ bucketing


def plan_micro_batches(lengths: np.ndarray, max_tokens: int, overhead_tokens: int = 256) -> list[np.ndarray]:
    """Cut rows, sorted longest first, into contiguous micro-batches minimising

        sum over micro-batches of (rows x longest row + overhead_tokens)
        subject to rows x longest row <= max_tokens (a row longer than that goes alone),

    by dynamic programming over the sorted rows (best[i] = cheapest plan of rows i..n-1).
    ``overhead_tokens`` prices one more forward/backward pass in tokens: it trades padding against
    the number of passes. Neighbours in sorted order have similar lengths, so padding stays small.
    """
    order = np.argsort(-np.asarray(lengths), kind="stable")
    sorted_len = np.asarray(lengths)[order].astype(np.int64)
    n = sorted_len.size
    best = np.zeros(n + 1)
    cut = np.zeros(n, dtype=np.int64)
    for i in range(n - 1, -1, -1):  # a loop over rows, vectorised over the micro-batch size
        k_max = max(1, int(max_tokens) // max(1, int(sorted_len[i])))
        ends = np.arange(i + 1, min(n, i + k_max) + 1)
        cost = (ends - i) * sorted_len[i] + overhead_tokens + best[ends]
        j = int(np.argmin(cost))
        best[i], cut[i] = cost[j], ends[j]
    groups, i = [], 0
    while i < n:
        groups.append(order[i : cut[i]])
        i = int(cut[i])
    return groups


def deal_to_ranks(groups: list[np.ndarray], lengths: np.ndarray, world_size: int) -> list[list[np.ndarray]]:
    """Largest micro-batch first to the rank with the fewest micro-batches, then fewest tokens:
    counts differ by at most one and tokens stay balanced."""
    shares: list[list[np.ndarray]] = [[] for _ in range(world_size)]
    load = [0] * world_size
    for g in sorted(groups, key=lambda g: -int(lengths[g].sum())):
        r = min(range(world_size), key=lambda r: (len(shares[r]), load[r]))
        shares[r].append(g)
        load[r] += int(lengths[g].sum())
    return shares


def _micro_batch(tok: _Tokens, rows: np.ndarray, mask_of: np.ndarray, constrainer, pad_id: int) -> MicroBatch:
    lengths = tok.lengths[rows]
    B, L = len(rows), int(lengths.max())
    # flat index (into tok arrays) and (b, p) of every token of these rows, without a token loop
    first = np.repeat(np.cumsum(lengths) - lengths, lengths)
    pos = np.arange(lengths.sum()) - first
    b = np.repeat(np.arange(B), lengths)
    src = np.repeat(tok.offsets[rows], lengths) + pos

    input_ids = np.full((B, L), pad_id, dtype=np.int64)
    input_ids[b, pos] = tok.ids[src]
    attention_mask = np.zeros((B, L), dtype=np.int64)
    attention_mask[b, pos] = 1

    t = tok.generated[src]  # targets: generated tokens (never at p = 0: checked)
    src_t = src[t]
    masks = mask_of[src_t]
    used, compact = np.unique(masks[masks >= 0], return_inverse=True)
    constraint = np.full(masks.shape, UNCONSTRAINED, dtype=np.int64)
    constraint[masks >= 0] = compact.reshape(-1)
    words = constrainer.words if constrainer is not None else 0
    bitmasks = constrainer.bitmasks(used.tolist()) if used.size else torch.zeros((0, words), dtype=torch.int32)
    return MicroBatch(
        input_ids=torch.from_numpy(input_ids),
        attention_mask=torch.from_numpy(attention_mask),
        logit_pos=torch.from_numpy(b[t] * L + pos[t] - 1),
        target_ids=torch.from_numpy(tok.ids[src_t]),
        engine_logprobs=torch.from_numpy(tok.logprob[src_t]),
        credit=torch.from_numpy(tok.credit[src_t].astype(np.float32)),
        temperature=torch.from_numpy(tok.temperature[np.repeat(rows, lengths)[t]]),
        token_version=torch.from_numpy(tok.version[src_t]),
        constraint=torch.from_numpy(constraint),
        bitmasks=bitmasks,
    )


def _constraint_masks(tok: _Tokens, rows: np.ndarray, constrainer: Constrainer | None) -> np.ndarray:
    """Mask id per flat token (UNCONSTRAINED except in guided decisions of `rows`)."""
    mask_of = np.full(tok.ids.size, UNCONSTRAINED, dtype=np.int64)
    in_rows = np.zeros(tok.lengths.size, dtype=bool)
    in_rows[rows] = True
    row_of_decision = np.searchsorted(tok.offsets, tok.decision_start, side="right") - 1
    todo = np.flatnonzero(tok.guided & in_rows[row_of_decision])
    if todo.size and constrainer is None:
        raise BatchError("guided decisions need a Constrainer (xgrammar) to rebuild their constraint")
    for d in todo:  # one matcher walk per guided decision (cached by (regex, prefix))
        regex = tok.regex[d]
        if not regex:
            raise BatchError(f"a guided decision has an empty `{DECISION_REGEX}` (its constraint cannot be rebuilt)")
        s, n = int(tok.decision_start[d]), int(tok.decision_len[d])
        mask_of[s : s + n] = constrainer.decision_masks(regex, tok.ids[s : s + n].tolist())
    return mask_of


def _masks(tok: _Tokens, rows: np.ndarray, constrainer: Constrainer | None, guided_logprob: str) -> np.ndarray:
    """Mask id per flat token: the guided decisions' masks of `rows` under "constrained", none under "full"."""
    if guided_logprob == "constrained":
        return _constraint_masks(tok, rows, constrainer)
    return np.full(tok.ids.size, UNCONSTRAINED, dtype=np.int64)


def _constrainer_for(guided_logprob: str, constrainer: Constrainer | None) -> Constrainer | None:
    """The constrainer that scores guided tokens: none under `full` (the whole vocabulary)."""
    if guided_logprob not in GUIDED_LOGPROB:
        raise BatchError(f"guided_logprob must be one of {GUIDED_LOGPROB}, got {guided_logprob!r}")
    return None if guided_logprob == "full" else constrainer


def _validated(table: pa.Table) -> pa.Table:
    try:
        validate(table)
    except SchemaError as e:
        raise BatchError(f"invalid trajectory batch: {e}") from e
    return table


def build_iteration(
    batches: Sequence[pa.Table | pa.RecordBatch] | pa.Table | pa.RecordBatch,
    spec: CreditSpec,
    *,
    max_tokens: int = 4096,
    overhead_tokens: int = 256,
    rank: int = 0,
    world_size: int = 1,
    constrainer: Constrainer | None = None,
    pad_id: int = 0,
    guided_logprob: str = "constrained",
) -> IterationBatch:
    """Arrow trajectory batches of one iteration -> this rank's micro-batches (see module doc).

    `guided_logprob`: "constrained" scores guided tokens under the grammar-constrained distribution
    (needs `constrainer`); "full" scores every token under the full vocabulary (no masks)."""
    constrainer = _constrainer_for(guided_logprob, constrainer)
    if isinstance(batches, pa.RecordBatch):
        batches = [batches]
    table = _validated(batches if isinstance(batches, pa.Table) else concat(list(batches)))
    if table.num_rows == 0:
        raise BatchError("empty trajectory batch")
    C = row_credits(table, spec)
    tok = _tokens(table, C)
    lengths = tok.lengths
    gen = tok.generated

    shares = deal_to_ranks(plan_micro_batches(lengths, max_tokens, overhead_tokens), lengths, world_size)
    n_micro = max(len(s) for s in shares)
    mine = shares[rank]
    rows = np.concatenate(mine) if mine else np.zeros(0, dtype=np.int64)
    mask_of = _masks(tok, rows, constrainer, guided_logprob)
    words = constrainer.words if constrainer is not None else 0
    micro = [_micro_batch(tok, g, mask_of, constrainer, pad_id) for g in mine]
    micro += [MicroBatch.dummy(pad_id, words) for _ in range(n_micro - len(mine))]

    n_tok = int(gen.sum())
    guided_tok = int(tok.decision_len[tok.guided].sum())
    return IterationBatch(
        micro_batches=micro,
        n_tok=n_tok,
        n_rows=int(lengths.size),
        n_micro=n_micro,
        real_tokens=int(lengths.sum()),
        padded_tokens=sum(len(g) * int(lengths[g].max()) for s in shares for g in s),
        n_guided_tokens=guided_tok,
        credit_mean=float(tok.credit[gen].mean()) if n_tok else 0.0,
        credit_abs_mean=float(np.abs(tok.credit[gen]).mean()) if n_tok else 0.0,
    )


# ------------------------------------------------------------------------------------ shards


def assign_shards(tokens: Sequence[int], world_size: int) -> list[list[int]]:
    """Batches (shards) to ranks, largest first to the rank with the fewest tokens (then the lowest
    rank): each rank's shard indices, ascending. Deterministic, so every rank computes the same."""
    ranks: list[list[int]] = [[] for _ in range(world_size)]
    load = [0] * world_size
    for i in sorted(range(len(tokens)), key=lambda i: (-int(tokens[i]), i)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        ranks[r].append(i)
        load[r] += int(tokens[i])
    return [sorted(r) for r in ranks]


def build_rank_iteration(
    summaries: Sequence[pa.RecordBatch | pa.Table],
    fetch: Callable[[list[int]], Sequence[pa.Table | pa.RecordBatch]],
    spec: CreditSpec,
    *,
    rank: int,
    world_size: int,
    max_tokens: int = 4096,
    overhead_tokens: int = 256,
    constrainer: Constrainer | None = None,
    pad_id: int = 0,
    guided_logprob: str = "constrained",
) -> IterationBatch:
    """This rank's micro-batches when each rank fetches only its own batches (see module doc).

    `summaries[i]` is the summary of batch i; `fetch(indices)` returns those batches (called once,
    with this rank's indices only). Credits and the whole plan come from the summaries."""
    constrainer = _constrainer_for(guided_logprob, constrainer)
    meta = concat_summaries(list(summaries))
    if meta.num_rows == 0:
        raise BatchError("empty trajectory batch")
    C = row_credits(meta, spec)
    sizes = np.array([s.num_rows for s in summaries], dtype=np.int64)
    first = np.r_[0, np.cumsum(sizes)]
    trainable = np.asarray(meta.column("trainable"), dtype=bool)
    chat = np.asarray(meta.column("chat_tokens"), dtype=np.int64)
    generated = np.asarray(meta.column("generated_tokens"), dtype=np.int64)
    train_tokens = [int(chat[a:b][trainable[a:b]].sum()) for a, b in zip(first[:-1], first[1:], strict=True)]
    shards = assign_shards(train_tokens, world_size)

    def rows_of(idx: list[int]) -> np.ndarray:
        return np.concatenate([np.arange(first[i], first[i + 1]) for i in idx]) if idx else np.zeros(0, np.int64)

    shard_lengths = [chat[rows][trainable[rows]] for rows in map(rows_of, shards)]  # training rows, per rank
    plans = [plan_micro_batches(lens, max_tokens, overhead_tokens) for lens in shard_lengths]  # every rank's
    n_micro = max(max(len(p) for p in plans), 1)
    mine = shards[rank]
    words = constrainer.words if constrainer is not None else 0
    micro: list[MicroBatch] = []
    guided_tok, local_tok, c_sum, c_abs = 0, 0, 0.0, 0.0
    if mine:
        table = _validated(concat(list(fetch(mine))))
        rows = rows_of(mine)
        if table.num_rows != rows.size:
            raise BatchError(f"this rank's batches have {table.num_rows} rows, their summaries {rows.size}")
        for col in ("game_id", "seat"):
            if not np.array_equal(np.asarray(table.column(col)), np.asarray(meta.column(col))[rows]):
                raise BatchError("this rank's batches and their summaries are out of step (games and seats differ)")
        tok = _tokens(table, C[rows])
        if not np.array_equal(tok.lengths, shard_lengths[rank]):
            raise BatchError("a batch's token lengths differ from its summary's chat_tokens")
        mask_of = _masks(tok, np.arange(tok.lengths.size), constrainer, guided_logprob)
        micro = [_micro_batch(tok, g, mask_of, constrainer, pad_id) for g in plans[rank]]
        gen = tok.generated
        guided_tok = int(tok.decision_len[tok.guided].sum())
        local_tok = int(gen.sum())
        c_sum, c_abs = float(tok.credit[gen].sum()), float(np.abs(tok.credit[gen]).sum())
    micro += [MicroBatch.dummy(pad_id, words) for _ in range(n_micro - len(micro))]
    lengths = chat[trainable]
    n_tok = int(generated[trainable].sum())
    padded = sum(len(g) * int(lens[g].max()) for lens, plan in zip(shard_lengths, plans, strict=True) for g in plan)
    return IterationBatch(
        micro_batches=micro,
        n_tok=n_tok,
        n_rows=int(lengths.size),
        n_micro=n_micro,
        real_tokens=int(lengths.sum()),
        padded_tokens=padded,
        n_guided_tokens=guided_tok,
        credit_mean=c_sum / local_tok if local_tok else 0.0,
        credit_abs_mean=c_abs / local_tok if local_tok else 0.0,
        local_tok=local_tok,
    )
