"""Learner throughput on SmolLM2-135M: the DeepSpeed Learner over a bare torch+peft loop, and MFU.

Usage: python benchmarks/bench_learner.py [--games 8] [--steps 2] [--threads N] [--dtype auto]

- Batch: IPD-like games with the real tokenizer: a ~130-token rules prompt, then per round a guided
  `<A>`/`<B>` + eos (4 generated tokens) and the next user turn; 2..10 rounds per game, so rows are
  ~150-400 tokens; both seats trainable; AA credits; entropy coef 0.01 (the IPD AA config).
- learner_tok_s: (prompt + generated) tokens per second of `Learner.train_step` (Arrow -> credits
  -> micro-batches -> constraint masks -> forward/backward -> one DeepSpeed AdamW step), ZeRO-1, 1 rank.
- bare_tok_s: the same micro-batches through a minimal loop in the same process: PEFT model,
  decoder -> hidden at target positions -> lm_head -> log-softmax -> -(C * logp).sum() / N_tok,
  backward, clip_grad_norm_, torch AdamW step. No DeepSpeed, no grammar masks, no statistics. Both
  checkpoint the same share of layers (`learner.gradient_checkpointing`, the CPU default: half).
  Steps alternate learner/bare after one warm-up each; medians are reported.
- FLOPs of one step (real tokens T, targets n, decoder linear weights N_body, LoRA weights N_lora,
  vocab V, hidden H; the frozen base needs activation gradients only):
      forward  = 2*N_body*T + 2*N_lora*T + 2*V*H*n
      backward = 2*N_body*T + 4*N_lora*T + 2*V*H*n        (LoRA also gets weight gradients)
  attention score/value FLOPs are left out (under 10% at these lengths): MFU is a lower bound.
- peak: the measured matmul FLOP/s of this machine in the compute dtype (a large square matmul,
  same threads); both the bf16 and the fp32 peaks are reported. dtype auto = bf16 only where the
  hardware computes it natively (on an AVX2-only CPU bf16 matmuls are emulated, ~100x slower).
Prints ONE JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MODEL = ROOT / "models" / "smollm2-135m-instruct"
RULES = (
    "You are playing a game against another agent. The game is played over several rounds. In each "
    "round, you and the other agent each choose one of two actions, <A> or <B>, at the same time, "
    "without knowing the other's choice. Points: if you both choose <A>, you each get 3 points. If you "
    "both choose <B>, you each get 1 point. If you choose <B> and the other chooses <A>, you get 5 "
    "points and the other gets 0. If you choose <A> and the other chooses <B>, you get 0 points and the "
    "other gets 5. Your goal is to maximise your total points. After each round you will be told what "
    "the other agent played. Answer exactly <A> or <B>; anything else is an error."
)
TURN = "\n<|im_start|>user\nLast round, the other agent played {other}.<|im_end|>\n<|im_start|>assistant\n"
PAYOFF = {("C", "C"): (3, 3), ("C", "D"): (0, 5), ("D", "C"): (5, 0), ("D", "D"): (1, 1)}


def make_table(tok, n_games: int, seed: int = 0):
    import numpy as np
    import pyarrow as pa

    from actors.trajectories import SeatTrajectory, to_batch

    rng = np.random.default_rng(seed)
    prompt = tok.apply_chat_template([{"role": "user", "content": RULES}], add_generation_prompt=True,
                                     tokenize=True, return_dict=False)
    rows = []
    for g in range(n_games):
        n_rounds = int(rng.integers(2, 11))
        seats = [SeatTrajectory("bench", 0, g, 0, "ipd", 0, s, "learner", 0, "learner", 0, True, 1.0) for s in (0, 1)]
        for s in seats:
            s.add_prompt(prompt)
        for t in range(n_rounds):
            acts = [str(rng.choice(["C", "D"])) for _ in (0, 1)]
            for i, s in enumerate(seats):
                label = "<A>" if acts[i] == "C" else "<B>"
                ids = tok.encode(label, add_special_tokens=False) + [tok.eos_token_id]
                s.add_generated(ids, [0.0, float(np.log(0.4 + 0.2 * rng.random())), 0.0, 0.0], t, 0)
                s.guided.append(True)
                s.decision_regex.append("(<A>|<B>)")
                s.rewards.append(float(PAYOFF[(acts[0], acts[1])][i]))
                s.actions.append(acts[i])
                other = "<A>" if acts[1 - i] == "C" else "<B>"
                turn = TURN.format(other=other)
                s.add_prompt(tok.encode(turn, add_special_tokens=False))
        rows += seats
    return pa.Table.from_batches([to_batch(rows)])


def matmul_peak(dtype, n: int, reps: int) -> float:
    import torch

    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t)


class BareLoop:
    """The minimal torch + peft training step on the learner's micro-batches."""

    def __init__(self, model_dir: Path, dtype, r: int, alpha: int, lr: float, checkpoint_share: float) -> None:
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        from learner.learner import checkpoint_layers

        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
        base.config.use_cache = False
        checkpoint_layers(base, checkpoint_share)  # the learner's memory setting: what is compared is the rest
        self.model = get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha, target_modules="all-linear",
                                                     lora_dropout=0.0)).train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=lr)

    def step(self, it) -> None:
        import torch

        core = self.model.get_base_model()
        for mb in it.micro_batches:
            hidden = core.get_decoder()(input_ids=mb.input_ids, attention_mask=mb.attention_mask).last_hidden_state
            h = hidden.reshape(-1, hidden.shape[-1])[mb.logit_pos]
            logp = torch.log_softmax(core.get_output_embeddings()(h).float(), -1)
            logp = logp.gather(-1, mb.target_ids[:, None]).squeeze(-1)
            (-(mb.credit * logp).sum() / it.n_tok).backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def step_flops(it, n_body: int, n_lora: int, vocab: int, hidden: int) -> float:
    T = sum(mb.n_real_tokens for mb in it.micro_batches)
    n = sum(mb.n_targets for mb in it.micro_batches)
    forward = 2 * n_body * T + 2 * n_lora * T + 2 * vocab * hidden * n
    backward = 2 * n_body * T + 4 * n_lora * T + 2 * vocab * hidden * n
    return float(forward + backward)


def main() -> None:
    import contextlib

    out = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):  # library chatter off stdout: the JSON line only
        result = run()
    print(json.dumps(result), file=out)


def run() -> dict:
    import dataclasses

    import torch
    from transformers import AutoTokenizer

    from learner.batch import build_iteration
    from learner.learner import Learner, resolve_dtype
    from reciprocity.config import Config
    from reciprocity.train import learner_config

    ap = argparse.ArgumentParser()
    ap.add_argument("--games", type=int, default=8)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--micro-batch-tokens", type=int, default=4096)
    ap.add_argument("--lora-r", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    dtype = resolve_dtype(args.dtype)
    peak_fp32 = matmul_peak(torch.float32, 2048, 3)
    peak_bf16 = matmul_peak(torch.bfloat16, 2048 if dtype == torch.bfloat16 else 512, 2)
    peak = peak_bf16 if dtype == torch.bfloat16 else peak_fp32

    tok = AutoTokenizer.from_pretrained(str(MODEL))
    table = make_table(tok, args.games)
    cfg = dataclasses.replace(learner_config(Config()), model_dir=str(MODEL), lora_r=args.lora_r,
                              lora_alpha=2 * args.lora_r, lr=1e-5, zero_stage=1, dtype=args.dtype,
                              micro_batch_tokens=args.micro_batch_tokens, credit_method="aa", reward_normaliser=5.0,
                              entropy_coef=0.01, num_threads=args.threads)
    learner = Learner(cfg)
    learner.setup()
    bare = BareLoop(MODEL, dtype, args.lora_r, 2 * args.lora_r, 1e-5, cfg.gradient_checkpointing)
    it = build_iteration(table, cfg.credit, max_tokens=cfg.micro_batch_tokens,
                         overhead_tokens=cfg.micro_batch_overhead_tokens, constrainer=learner.constrainer,
                         pad_id=learner.pad_id)

    learner.train_step([table])  # warm-up (allocator, first-call paths)
    bare.step(it)
    t_learner, t_bare, phases = [], [], []
    for _ in range(args.steps):
        t = time.perf_counter()
        m = learner.train_step([table])
        t_learner.append(time.perf_counter() - t)
        phases.append(m)
        t = time.perf_counter()
        bare.step(it)
        t_bare.append(time.perf_counter() - t)

    core = learner.model.get_base_model()
    n_body = sum(p.numel() for n, p in core.get_decoder().named_parameters()
                 if n.endswith("proj.base_layer.weight") or (n.endswith("proj.weight") and "lora" not in n))
    n_lora = sum(p.numel() for n, p in learner.model.named_parameters() if "lora_" in n)
    vocab, hidden = core.config.vocab_size, core.config.hidden_size
    flops = step_flops(it, n_body, n_lora, vocab, hidden)
    tokens = it.real_tokens
    s_learner, s_bare = statistics.median(t_learner), statistics.median(t_bare)
    result = {
        "name": "learner",
        "learner_tok_s": tokens / s_learner,
        "bare_tok_s": tokens / s_bare,
        "learner_over_bare_ratio": s_bare / s_learner,
        "mfu_ratio": flops / s_learner / peak,
        "bare_mfu_ratio": flops / s_bare / peak,
        "achieved_tflop_s": flops / s_learner / 1e12,
        "peak_tflop_s": peak / 1e12,
        "peak_fp32_tflop_s": peak_fp32 / 1e12,
        "peak_bf16_tflop_s": peak_bf16 / 1e12,
        "dtype": str(dtype).removeprefix("torch."),
        "threads": args.threads,
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "model": MODEL.name,
        "rows": it.n_rows,
        "tokens_per_step": tokens,
        "generated_tokens_per_step": it.n_tok,
        "row_tokens_min_max": [int(v) for v in (min(table.column("token_ids").to_pylist(), key=len).__len__(),
                                                max(table.column("token_ids").to_pylist(), key=len).__len__())],
        "micro_batches": it.n_micro,
        "padding_frac": it.padding_fraction,
        "flops_per_step": flops,
        "n_body_params": n_body,
        "n_lora_params": n_lora,
        "learner_step_s": s_learner,
        "bare_step_s": s_bare,
        "learner_phase_s": {k: statistics.median(m[k] for m in phases)
                            for k in ("time_to_tensors_s", "time_forward_backward_s", "time_step_s")},
        "loadavg_1m": os.getloadavg()[0],
        "flops_formula": "fwd 2*N_body*T + 2*N_lora*T + 2*V*H*n_targets; bwd 2*N_body*T + 4*N_lora*T + "
                         "2*V*H*n_targets; attention excluded",
    }
    return result


if __name__ == "__main__":
    main()
