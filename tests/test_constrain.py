"""learner.constrain: xgrammar masks of guided decisions, the renormalised log-probs on a tiny model,
and (slow) agreement with vLLM's processed log-probs of guided samples."""

from __future__ import annotations

import pytest
import torch
from support import IPD_REGEX, RULES

from learner.constrain import UNCONSTRAINED, Constrainer, unpack_bitmask, vllm_stop_token_ids
from learner.loss import constrained_logits, token_logprobs


@pytest.fixture(scope="module")
def constrainer(tokenizer):
    return Constrainer(tokenizer, len(tokenizer), stop_token_ids=[tokenizer.eos_token_id])


def _allowed(con: Constrainer, mask_id: int) -> list[int]:
    return torch.nonzero(unpack_bitmask(con.bitmasks([mask_id]), con.vocab_size)[0]).flatten().tolist()


def test_ipd_masks_force_all_but_the_choice(tokenizer, constrainer) -> None:
    eos = tokenizer.eos_token_id
    ids_a = tokenizer.encode("<A>", add_special_tokens=False) + [eos]
    ids_b = tokenizer.encode("<B>", add_special_tokens=False) + [eos]
    masks = constrainer.decision_masks(IPD_REGEX, ids_a)
    allowed = [_allowed(constrainer, m) for m in masks]
    # "<A>" is `<` `A` `>`: `<` forced, then A or B, then `>` forced, then the stop token forced
    assert ids_a == [44, 49, 46, eos] and ids_b[1] == 50
    assert allowed == [[44], [49, 50], [46], [eos]]
    assert constrainer.decision_masks(IPD_REGEX, ids_b)[:1] == masks[:1]  # cached shared prefix
    n = len(constrainer.bitmasks())
    for _ in range(50):
        constrainer.decision_masks(IPD_REGEX, ids_a)
    assert len(constrainer.bitmasks()) == n  # repeats add no masks


def test_rejected_and_post_stop_tokens_stay_unconstrained(tokenizer, constrainer) -> None:
    eos = tokenizer.eos_token_id
    bad = tokenizer.encode("<C>", add_special_tokens=False)
    before = constrainer.n_rejected
    masks = constrainer.decision_masks(IPD_REGEX, bad)
    assert masks[0] != UNCONSTRAINED and masks[1:] == [UNCONSTRAINED] * (len(bad) - 1)
    assert constrainer.n_rejected == before + len(bad) - 1
    tail = tokenizer.encode("<A>", add_special_tokens=False) + [eos, 198]
    assert constrainer.decision_masks(IPD_REGEX, tail)[-1] == UNCONSTRAINED
    assert constrainer.n_after_stop >= 1


def test_free_text_regex_masks(tokenizer, constrainer) -> None:
    regex = "<<message_start>>[^<>]{0,500}<<message_end>>"
    ids = tokenizer.encode("<<message_start>>I have paper, let us split fairly.<<message_end>>",
                           add_special_tokens=False) + [tokenizer.eos_token_id]
    masks = constrainer.decision_masks(regex, ids)
    assert UNCONSTRAINED not in masks
    assert len(_allowed(constrainer, masks[len(ids) // 2])) > 1000  # free text inside the message


def test_constrained_logprobs_on_tiny_model(tiny_model_dir, tokenizer, constrainer) -> None:
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": RULES}], add_generation_prompt=True,
                                           tokenize=True, return_dict=False)
    gen = tokenizer.encode("<B>", add_special_tokens=False) + [tokenizer.eos_token_id]
    ids = torch.tensor([prompt + gen])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].float()
    masks = torch.tensor(constrainer.decision_masks(IPD_REGEX, gen))
    uniq, idx = torch.unique(masks, return_inverse=True)
    z = constrained_logits(logits, torch.ones(len(gen)), idx, constrainer.bitmasks(uniq.tolist()))
    logp = token_logprobs(z, torch.tensor(gen))
    assert logp[[0, 2, 3]].tolist() == [0.0, 0.0, 0.0]  # forced tokens: exactly log 1
    restricted = torch.log_softmax(logits[1, [49, 50]], -1)[1]  # B among {A, B}
    assert logp[1].item() == pytest.approx(restricted.item(), abs=1e-6)


def test_vllm_stop_tokens_read_generation_config(model_dir, tokenizer) -> None:
    assert vllm_stop_token_ids(model_dir, tokenizer) == [tokenizer.eos_token_id]


@pytest.mark.slow
def test_matches_vllm_processed_logprobs_of_guided_samples(tiny_model_dir, tokenizer) -> None:
    """Guided samples from a real vLLM engine (bf16, temperature 0.8, processed_logprobs): the
    learner's constrained log-probs (fp32) agree within bf16 tolerance; forced tokens are 0 in both."""
    from transformers import AutoModelForCausalLM
    from vllm import LLM, SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    temperature = 0.8
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": RULES}], add_generation_prompt=True,
                                           tokenize=True, return_dict=False)
    llm = LLM(model=str(tiny_model_dir), enforce_eager=True, max_model_len=1024, dtype="bfloat16",
              logprobs_mode="processed_logprobs", seed=0, gpu_memory_utilization=0.1,
              max_num_seqs=8, max_num_batched_tokens=1024)
    try:
        params = [
            SamplingParams(temperature=temperature, max_tokens=8, logprobs=0, seed=s,
                           structured_outputs=StructuredOutputsParams(regex=IPD_REGEX))
            for s in range(6)
        ]
        outs = llm.generate([{"prompt_token_ids": prompt}] * len(params), params, use_tqdm=False)
    finally:
        del llm
    samples = [(list(o.outputs[0].token_ids), [e[t].logprob for e, t in
                zip(o.outputs[0].logprobs, o.outputs[0].token_ids, strict=True)]) for o in outs]

    con = Constrainer.from_model_dir(tiny_model_dir, tokenizer)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    worst = 0.0
    for gen, engine_logp in samples:
        assert tokenizer.decode(gen, skip_special_tokens=True) in ("<A>", "<B>")
        ids = torch.tensor([prompt + gen])
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompt) - 1 : -1].float()
        masks = torch.tensor(con.decision_masks(IPD_REGEX, gen))
        assert (masks != UNCONSTRAINED).all()
        uniq, idx = torch.unique(masks, return_inverse=True)
        z = constrained_logits(logits, torch.full((len(gen),), temperature), idx, con.bitmasks(uniq.tolist()))
        logp = token_logprobs(z, torch.tensor(gen))
        forced = [i for i, m in enumerate(masks.tolist()) if len(_allowed(con, m)) == 1]
        assert forced and all(engine_logp[i] == 0.0 and logp[i].item() == 0.0 for i in forced)
        torch.testing.assert_close(logp, torch.tensor(engine_logp), rtol=0, atol=2e-2)
        worst = max(worst, float((logp - torch.tensor(engine_logp)).abs().max()))
    print(f"learner vs vLLM guided log-probs: max |diff| {worst:.2e} over {len(samples)} samples")
