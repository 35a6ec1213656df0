"""Learner throughput on SmolLM2-135M: the DeepSpeed Learner over a bare torch+peft loop, and MFU.

Usage: python benchmarks/bench_learner.py [--games 8] [--steps 2] [--threads N] [--dtype auto]
                                          [--model-dir DIR] [--config configs/ipd_aa.yaml]

- Learner: by default the smoke-like CPU setting below (ZeRO-1, lr 1e-5, AA, 4096-token
  micro-batches); with --config, exactly the learner that config's run builds
  (`reciprocity.learner_settings.learner_config`: ZeRO stage, dtype, micro-batch tokens, LoRA,
  checkpointing), its model path replaced by --model-dir.
- Device: the learner's (CUDA where torch sees a GPU, else CPU); the bare loop and the matmul peak
  run there too, timed with the device synchronised. On CUDA the learner's peak allocated memory
  after its warm-up step is reported (before the bare loop's model is loaded).

- Batch: IPD-like games with the real tokenizer: a ~130-token rules prompt, then per round a guided
  `<A>`/`<B>` + eos (4 generated tokens) and the next user turn; 2..10 rounds per game, so rows are
  ~150-400 tokens; both seats trainable; AA credits; entropy coef 0.01 (the IPD AA config).
- learner_tok_s: (prompt + generated) tokens per second of `Learner.train_step` (Arrow -> credits
  -> micro-batches -> constraint masks -> forward/backward -> one DeepSpeed AdamW step), ZeRO-1, 1 rank.
- bare_tok_s: the same micro-batches through a minimal loop in the same process: PEFT model,
  decoder -> hidden at target positions -> lm_head -> log-softmax -> -(C * logp).sum() / N_tok,
  backward, clip_grad_norm_, torch AdamW step. No DeepSpeed, no grammar masks, no statistics. Both
  checkpoint the same share of layers (`learner.gradient_checkpointing`, the CPU default: half).
  On CPU, steps alternate learner/bare after one warm-up each; on CUDA the learner's steps run
  first and its model is freed before the bare loop's is loaded; medians are reported.
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


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(dtype, n: int, reps: int, device=None) -> float:
    import torch

    device = device or torch.device("cpu")
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    for _ in range(3 if device.type == "cuda" else 1):
        a @ b
    synchronize(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    synchronize(device)
    return 2 * n**3 * reps / (time.perf_counter() - t)


class BareLoop:
    """The minimal torch + peft training step on the learner's micro-batches."""

    def __init__(self, model_dir: Path, dtype, r: int, alpha: int, lr: float, checkpoint_share: float,
                 device=None) -> None:
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
        self.device = device or torch.device("cpu")
        self.model.to(self.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=lr)

    def step(self, it) -> None:
        import torch

        core = self.model.get_base_model()
        for mb in it.micro_batches:
            mb = mb.to(self.device)
            hidden = core.get_decoder()(input_ids=mb.input_ids, attention_mask=mb.attention_mask).last_hidden_state
            h = hidden.reshape(-1, hidden.shape[-1])[mb.logit_pos]
            logp = torch.log_softmax(core.get_output_embeddings()(h).float(), -1)
            logp = logp.gather(-1, mb.target_ids[:, None]).squeeze(-1)
            (-(mb.credit * logp).sum() / it.n_tok).backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        synchronize(self.device)


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
    import gc

    import torch
    from transformers import AutoTokenizer

    from learner.batch import build_iteration
    from learner.learner import Learner
    from reciprocity.config import Config, load_config
    from reciprocity.learner_settings import learner_config

    ap = argparse.ArgumentParser()
    ap.add_argument("--games", type=int, default=8)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--micro-batch-tokens", type=int, default=4096)
    ap.add_argument("--lora-r", type=int, default=32)
    ap.add_argument("--model-dir", type=Path, default=MODEL)
    ap.add_argument("--config", type=Path, default=None, help="a run config whose learner is measured")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override in --config")
    ap.add_argument("--no-bare", action="store_true", help="the learner alone (no bare-loop comparison)")
    args = ap.parse_args()
    if args.set and args.config is None:
        ap.error("--set overrides a key of --config: name the config")
    torch.set_num_threads(args.threads)
    model_dir = args.model_dir.absolute()

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    table = make_table(tok, args.games)
    if args.config is None:
        cfg = dataclasses.replace(learner_config(Config()), model_dir=str(model_dir), lora_r=args.lora_r,
                                  lora_alpha=2 * args.lora_r, lr=1e-5, zero_stage=1, dtype=args.dtype,
                                  micro_batch_tokens=args.micro_batch_tokens, credit_method="aa",
                                  reward_normaliser=5.0, entropy_coef=0.01, num_threads=args.threads)
    else:
        cfg = dataclasses.replace(learner_config(load_config(args.config, [*args.set, f"model.path={model_dir}"])),
                                  num_threads=args.threads)
    learner = Learner(cfg)
    learner.setup()
    device, dtype = learner.device, learner.dtype
    cuda = device.type == "cuda"
    peak_fp32 = matmul_peak(torch.float32, 8192 if cuda else 2048, 10 if cuda else 3, device)
    peak_bf16 = matmul_peak(torch.bfloat16, 8192 if cuda else 2048 if dtype == torch.bfloat16 else 512,
                            10 if cuda else 2, device)
    peak = peak_bf16 if dtype == torch.bfloat16 else peak_fp32
    learner.train_step([table])  # warm-up (allocator, first-call paths, kernels)
    learner_peak_gb = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    it = build_iteration(table, cfg.credit, max_tokens=cfg.micro_batch_tokens,
                         overhead_tokens=cfg.micro_batch_overhead_tokens, constrainer=learner.constrainer,
                         pad_id=learner.pad_id)
    core = learner.model.get_base_model()
    n_body = sum(p.numel() for n, p in core.get_decoder().named_parameters()
                 if n.endswith("proj.base_layer.weight") or (n.endswith("proj.weight") and "lora" not in n))
    n_lora = sum(p.numel() for n, p in learner.model.named_parameters() if "lora_" in n)
    vocab, hidden = core.config.vocab_size, core.config.hidden_size
    flops = step_flops(it, n_body, n_lora, vocab, hidden)

    t_learner, t_bare, phases = [], [], []

    def learner_step() -> None:
        t = time.perf_counter()
        phases.append(learner.train_step([table]))  # its metrics are host floats: the device has finished
        t_learner.append(time.perf_counter() - t)

    def new_bare() -> BareLoop:
        return BareLoop(model_dir, dtype, cfg.lora_r, cfg.lora_alpha, cfg.lr, cfg.gradient_checkpointing, device)

    def bare_step() -> None:
        t = time.perf_counter()
        bare.step(it)
        t_bare.append(time.perf_counter() - t)

    bare_peak_gb, bare_error = None, None
    if cuda:  # one model on the device at a time: a 7B model's activations leave no room for two
        for _ in range(args.steps):
            learner_step()
        del learner, core
        gc.collect()
        torch.cuda.empty_cache()
        if not args.no_bare:
            try:  # the learner's figures are kept if the bare loop (fp32 adapters: more memory) does not fit
                bare = new_bare()
                torch.cuda.reset_peak_memory_stats(device)
                bare.step(it)
                bare_peak_gb = torch.cuda.max_memory_allocated(device) / 2**30
                for _ in range(args.steps):
                    bare_step()
            except torch.OutOfMemoryError as e:
                bare_error, t_bare = f"out of memory: {str(e).splitlines()[0]}", []
    else:  # alternating steps: the CPU's clock and neighbours drift alike for both
        if not args.no_bare:
            bare = new_bare()
            bare.step(it)
        for _ in range(args.steps):
            learner_step()
            if not args.no_bare:
                bare_step()

    tokens = it.real_tokens
    s_learner = statistics.median(t_learner)
    s_bare = statistics.median(t_bare) if t_bare else None
    result = {
        "name": "learner",
        "learner_tok_s": tokens / s_learner,
        "bare_tok_s": tokens / s_bare if s_bare else None,
        "learner_over_bare_ratio": s_bare / s_learner if s_bare else None,
        "mfu_ratio": flops / s_learner / peak,
        "bare_mfu_ratio": flops / s_bare / peak if s_bare else None,
        "achieved_tflop_s": flops / s_learner / 1e12,
        "peak_tflop_s": peak / 1e12,
        "peak_fp32_tflop_s": peak_fp32 / 1e12,
        "peak_bf16_tflop_s": peak_bf16 / 1e12,
        "dtype": str(dtype).removeprefix("torch."),
        "threads": args.threads,
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "learner_cuda_peak_allocated_gb": learner_peak_gb,
        "bare_cuda_peak_allocated_gb": bare_peak_gb,
        "bare_error": bare_error,
        "config": str(args.config) if args.config else None,
        "overrides": args.set,
        "zero_stage": cfg.zero_stage,
        "micro_batch_tokens": cfg.micro_batch_tokens,
        "lora_r": cfg.lora_r,
        "model": model_dir.name,
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
