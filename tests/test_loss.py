"""learner.loss against hand-derived gradients, the constrained distribution, and on a tiny model
(prompt tokens get no gradient, KL = 0 for a zero adapter, accumulation == full batch)."""

from __future__ import annotations

import math

import pytest
import torch
from support import ipd_table

from learner.batch import CreditSpec, build_iteration
from learner.loss import (
    IW_CAP,
    LossCoefs,
    constrained_logits,
    entropy,
    micro_batch_loss,
    policy_loss,
    token_logprobs,
)

T = 0.7
N_TOK = 5  # the iteration has more generated tokens than this micro-batch's two


def _case():
    torch.manual_seed(0)
    z = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)  # one logits row per token
    targets = torch.tensor([1, 4])
    credit = torch.tensor([0.5, -2.0], dtype=torch.float64)
    logp0 = torch.log_softmax(z.detach() / T, -1)[torch.arange(2), targets]
    engine_logp = logp0 + torch.tensor([0.1, -0.3], dtype=torch.float64)  # rho = e^-0.1, e^0.3
    return z, targets, credit, engine_logp


def test_policy_gradient_matches_hand_derivation() -> None:
    z, y, C, engine_logp = _case()
    temp = torch.full((2,), T, dtype=torch.float64)
    none = torch.full((2,), -1)
    logp = token_logprobs(constrained_logits(z, temp, none, torch.zeros(0, 1, dtype=torch.int32)), y)
    loss, stats = policy_loss(logp, engine_logp, C, N_TOK)
    loss.backward()
    # L = -(1/N) sum_i rho_i C_i log softmax(z_i / T)[y_i]
    # dL/dz_i = -(rho_i C_i / (N T)) (onehot(y_i) - softmax(z_i / T)),  rho = (e^-0.1, e^0.3)
    rho = torch.tensor([math.exp(-0.1), math.exp(0.3)], dtype=torch.float64)
    p = torch.softmax(z.detach() / T, -1)
    onehot = torch.nn.functional.one_hot(y, 6).double()
    expected = -(rho * C / (N_TOK * T))[:, None] * (onehot - p)
    torch.testing.assert_close(z.grad, expected)
    assert stats["iw"] == pytest.approx(float(rho.sum()))
    assert stats["iw_clipped"] == 0


def test_importance_weight_is_truncated_and_detached() -> None:
    z, y, C, engine_logp = _case()
    logp = torch.log_softmax(z / T, -1)[torch.arange(2), y]
    loss, stats = policy_loss(logp, engine_logp - 5.0, C, N_TOK)  # pi/pi_engine = e^5 > 2
    loss.backward()
    p = torch.softmax(z.detach() / T, -1)
    onehot = torch.nn.functional.one_hot(y, 6).double()
    expected = -(IW_CAP * C / (N_TOK * T))[:, None] * (onehot - p)  # rho = 2, no gradient through rho
    torch.testing.assert_close(z.grad, expected)
    assert stats["iw_clipped"] == 2


def test_entropy_and_kl_gradients_match_hand_derivation() -> None:
    z, y, C, engine_logp = _case()
    zT = z / T
    logp = torch.log_softmax(zT, -1)[torch.arange(2), y]
    ref = logp.detach() + torch.tensor([0.2, -0.4], dtype=torch.float64)  # D = (0.2, -0.4)
    lam_h, lam_kl = 0.3, 0.7
    H = entropy(zT)
    loss, stats = policy_loss(logp, engine_logp, torch.zeros(2, dtype=torch.float64), N_TOK,
                              LossCoefs(lam_h, lam_kl), H, ref)
    loss.backward()
    # entropy:  -lam_H/N * H,  dH/dz = -(1/T) p (log p + H)  ->  dL/dz = (lam_H/(N T)) p (log p + H)
    # KL (k3):  lam_KL/N * rho (e^D - D - 1), d/dlogp = rho (1 - e^D)  ->  times (1/T)(onehot - p)
    p = torch.softmax(z.detach() / T, -1)
    Hd = -(p * p.log()).sum(-1, keepdim=True)
    rho = torch.tensor([math.exp(-0.1), math.exp(0.3)], dtype=torch.float64)
    D = torch.tensor([0.2, -0.4], dtype=torch.float64)
    onehot = torch.nn.functional.one_hot(y, 6).double()
    expected = (lam_h / (N_TOK * T)) * p * (p.log() + Hd)
    expected += (lam_kl * rho * (1 - D.exp()) / (N_TOK * T))[:, None] * (onehot - p)
    torch.testing.assert_close(z.grad, expected)
    assert stats["kl"] == pytest.approx(float((D.exp() - D - 1).sum()))


def test_constrained_logprobs_forced_and_choice_tokens() -> None:
    torch.manual_seed(1)
    V = 40
    logits = torch.randn(3, V, requires_grad=True)
    allowed = [[7], [3, 9], []]  # forced, two-way choice, unconstrained
    bitmasks = torch.zeros(2, 2, dtype=torch.int32)
    for row, toks in enumerate(allowed[:2]):
        for t in toks:
            bitmasks[row, t // 32] |= 1 << (t % 32)
    z = constrained_logits(logits, torch.ones(3), torch.tensor([0, 1, -1]), bitmasks)
    logp = token_logprobs(z, torch.tensor([7, 9, 5]))
    assert logp[0].item() == 0.0  # forced: log 1 exactly
    choice = torch.log_softmax(logits.detach()[1, [3, 9]], -1)[1]
    assert logp[1].item() == pytest.approx(choice.item(), abs=1e-6)
    assert logp[2].item() == pytest.approx(torch.log_softmax(logits.detach()[2], -1)[5].item(), abs=1e-6)
    H = entropy(z)
    assert H[0].item() == 0.0
    logp[0].backward(retain_graph=True)
    assert logits.grad.abs().sum() == 0  # a forced token carries no gradient
    assert torch.isfinite(H).all()


def test_prompt_tokens_get_no_gradient(tokenizer) -> None:
    table = ipd_table(tokenizer, n_games=2, guided=False)
    it = build_iteration(table, CreditSpec(normaliser=5.0), max_tokens=10**6)
    (mb,) = it.micro_batches
    B, L = mb.input_ids.shape
    all_logits = torch.randn(B * L, 8, requires_grad=True)  # a logits row for every position
    vocab = torch.remainder(mb.target_ids, 8)
    mb.target_ids = vocab
    loss, _ = micro_batch_loss(mb, it.n_tok, LossCoefs(entropy=0.1), lambda m: all_logits[m.logit_pos])
    loss.backward()
    has_grad = all_logits.grad.abs().sum(-1) > 0
    predicts_generated = torch.zeros(B * L, dtype=torch.bool)
    predicts_generated[mb.logit_pos] = True
    assert torch.equal(has_grad, predicts_generated)  # only positions predicting generated tokens
    assert int(predicts_generated.sum()) == it.n_tok < int(mb.attention_mask.sum())


# ----------------------------------------------------------------------------- tiny model


def _peft(tiny_model_dir, init_lora_weights=True):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from learner.learner import TargetLogits

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                            lora_dropout=0.0, init_lora_weights=init_lora_weights))
    head = TargetLogits(model)
    return model, lambda mb: head(mb.input_ids, mb.attention_mask, mb.logit_pos)


def test_kl_is_zero_with_a_zero_adapter(tiny_model_dir, tokenizer) -> None:
    torch.set_num_threads(1)
    model, logits_fn = _peft(tiny_model_dir)  # LoRA B = 0: the adapter is the identity
    it = build_iteration(ipd_table(tokenizer, n_games=2, guided=False), CreditSpec(), max_tokens=10**6)
    loss, stats = micro_batch_loss(it.micro_batches[0], it.n_tok, LossCoefs(kl=1.0), logits_fn,
                                   model.disable_adapter)
    assert stats["kl"] == 0.0 and stats["loss_kl"] == 0.0
    assert math.isfinite(stats["loss"])


def test_accumulation_over_micro_batches_equals_full_batch(tiny_model_dir, tokenizer) -> None:
    torch.set_num_threads(1)
    model, logits_fn = _peft(tiny_model_dir, init_lora_weights=False)  # random A and B: all grads live
    table = ipd_table(tokenizer, n_games=3, seed=5, guided=False)
    coefs = LossCoefs(entropy=0.01, kl=0.1)

    def grads(max_tokens: int) -> tuple[int, dict[str, torch.Tensor]]:
        model.zero_grad()
        it = build_iteration(table, CreditSpec(normaliser=5.0), max_tokens=max_tokens)
        for mb in it.micro_batches:
            loss, _ = micro_batch_loss(mb, it.n_tok, coefs, logits_fn, model.disable_adapter)
            loss.backward()
        return it.n_micro, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    n_full, full = grads(10**6)
    n_acc, acc = grads(300)
    assert n_full == 1 and n_acc >= 2
    for name in full:
        torch.testing.assert_close(acc[name], full[name], rtol=1e-4, atol=1e-7)
