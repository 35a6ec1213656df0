"""The token loss of method spec section 4.6, written like the equation.

Over the whole iteration batch, N_tok = number of generated tokens (of all micro-batches and ranks):

    L = -(1/N_tok) sum_i rho_i * C_i * log pi(y_i)                         policy gradient
        - lambda_H  * (1/N_tok) sum_i H_i                                   entropy bonus
        + lambda_KL * (1/N_tok) sum_i rho_i * (exp(D_i) - D_i - 1)          KL to the base model (k3)

    D_i   = log pi_ref(y_i) - log pi(y_i)           pi_ref = base model (adapter disabled)
    rho_i = min(exp(clamp(log pi(y_i) - log pi_engine(y_i), -40, 40)), 2)   detached (truncated IW)

Every sum runs over this micro-batch's generated tokens but divides by the *iteration's* N_tok, so
summing micro-batch losses (gradient accumulation) gives the full-batch loss and gradient.

log pi, H and log pi_ref come from logits / T (T = the sampling temperature). For tokens of a
guided decision the distribution is the grammar-constrained one (learner.constrain): logits of
disallowed tokens are -inf, so log pi is renormalised over the allowed tokens, a forced token has
log pi = 0, and H is the entropy of the constrained distribution.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from learner.batch import MicroBatch
from learner.constrain import unpack_bitmask

IW_CAP = 2.0  # rho = min(pi / pi_engine, 2)
LOG_RATIO_CLAMP = 40.0

# names of the per-token sums a micro-batch contributes (summed over micro-batches and ranks,
# then divided by N_tok by the learner)
STAT_SUMS = (
    "loss",
    "loss_pg",
    "loss_entropy",
    "loss_kl",
    "abs_logp_diff",  # |log pi_learner - log pi_engine|
    "iw_clipped",  # rho hit the cap
    "iw",  # rho
    "entropy",
    "kl",  # rho-free k3 estimate of KL(pi || pi_ref)
    "tokens",
)


@dataclass(frozen=True)
class LossCoefs:
    entropy: float = 0.0  # lambda_H
    kl: float = 0.0  # lambda_KL


def constrained_logits(
    logits: torch.Tensor, temperature: torch.Tensor, constraint: torch.Tensor, bitmasks: torch.Tensor
) -> torch.Tensor:
    """z = logits / T, with z = -inf on tokens the grammar disallows (rows with constraint >= 0).

    logits [n, V] (float32), temperature [n], constraint [n] (row of bitmasks or -1), bitmasks
    [m, ceil(V/32)] int32 packed.
    """
    z = logits / temperature.unsqueeze(-1)
    guided = constraint >= 0
    if not bool(guided.any()):
        return z
    allowed = torch.ones_like(z, dtype=torch.bool)
    allowed[guided] = unpack_bitmask(bitmasks, z.shape[-1])[constraint[guided]]
    return z.masked_fill(~allowed, float("-inf"))


def token_logprobs(z: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log pi(y_i) = z_i[y_i] - logsumexp_v z_i[v]   (-inf entries are excluded from the sum)."""
    return z.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, dim=-1)


def entropy(z: torch.Tensor) -> torch.Tensor:
    """H_i = -sum_v pi_i(v) log pi_i(v) over the allowed tokens (0 * log 0 = 0 for masked ones)."""
    logp = torch.log_softmax(z, dim=-1)
    return -(logp.exp() * logp.masked_fill(torch.isinf(logp), 0.0)).sum(-1)


def policy_loss(
    logp: torch.Tensor,
    engine_logp: torch.Tensor,
    credit: torch.Tensor,
    n_tok: int,
    coefs: LossCoefs = LossCoefs(),
    entropy_tokens: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """This micro-batch's share of L (see module doc) and its per-token sums for the metrics.

    logp [n] (with grad), engine_logp [n], credit [n]; entropy_tokens [n] H_i (with grad when
    lambda_H > 0); ref_logp [n] log pi_ref (no grad), needed when lambda_KL > 0.
    """
    log_ratio = (logp.detach() - engine_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    rho = log_ratio.exp().clamp(max=IW_CAP)  # truncated importance weight, detached

    loss_pg = -(rho * credit * logp).sum() / n_tok
    loss = loss_pg
    stats = {"loss_pg": float(loss_pg.detach())}

    if entropy_tokens is not None:
        loss_entropy = -coefs.entropy * entropy_tokens.sum() / n_tok
        loss = loss + loss_entropy
        stats["loss_entropy"] = float(loss_entropy.detach())
        stats["entropy"] = float(entropy_tokens.detach().sum())
    if ref_logp is not None:
        D = ref_logp - logp
        k3 = D.exp() - D - 1.0
        loss_kl = coefs.kl * (rho * k3).sum() / n_tok
        loss = loss + loss_kl
        stats["loss_kl"] = float(loss_kl.detach())
        stats["kl"] = float(k3.detach().sum())

    stats.update(
        loss=float(loss.detach()),
        abs_logp_diff=float((logp.detach() - engine_logp).abs().sum()),
        iw_clipped=float((log_ratio > torch.log(torch.tensor(IW_CAP))).sum()),
        iw=float(rho.sum()),
        tokens=float(logp.numel()),
    )
    return loss, stats


def micro_batch_loss(
    mb: MicroBatch,
    n_tok: int,
    coefs: LossCoefs,
    logits_fn: Callable[[MicroBatch], torch.Tensor],
    ref_context: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Forward a micro-batch and return its share of L.

    logits_fn(mb) -> [n_targets, V] logits of the policy at mb.logit_pos; ref_context() is a
    context in which logits_fn gives the reference model's logits (adapter disabled), used when
    lambda_KL > 0. The entropy carries a gradient only when lambda_H > 0."""
    ref_logp = None
    if coefs.kl > 0:
        if ref_context is None:
            raise ValueError("lambda_KL > 0 needs the reference model (ref_context)")
        with torch.no_grad(), ref_context():
            z_ref = constrained_logits(logits_fn(mb), mb.temperature, mb.constraint, mb.bitmasks)
            ref_logp = token_logprobs(z_ref, mb.target_ids)
    z = constrained_logits(logits_fn(mb), mb.temperature, mb.constraint, mb.bitmasks)
    logp = token_logprobs(z, mb.target_ids)
    if coefs.entropy > 0:
        H = entropy(z)
    else:
        with torch.no_grad():
            H = entropy(z.detach())
    return policy_loss(logp, mb.engine_logprobs, mb.credit, n_tok, coefs, H, ref_logp)
