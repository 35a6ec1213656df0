"""Adapter export: the learner's LoRA weights -> an immutable :class:`actors.adapters.AdapterVersion`.

- Weights: ``peft.get_peft_model_state_dict`` (PEFT's own key format, which vLLM loads), gathered
  first under ZeRO-3 (``deepspeed.zero.GatheredParameters``: partitioned parameters are empty
  placeholders otherwise), serialised with ``safetensors.torch.save``; sha256 of those bytes.
- Config: the PEFT ``adapter_config.json`` dict, ``base_model_name_or_path`` = the served base
  model directory (adapters trained on that export must be served on it).
- Probe: fixed chat tokens and the learner's log-prob of each token given its prefix (with the
  adapter, temperature 1, no constraint); an engine recomputes them after loading the version.
- Loading the bytes back with ``peft.set_peft_model_state_dict`` restores the weights exactly.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from actors.adapters import AdapterVersion, Probe

PROBE_CHAT = (
    {"role": "user", "content": "You are playing a repeated game. Answer with <A> or <B>."},
    {"role": "assistant", "content": "<A>"},
    {"role": "user", "content": "Last round, the other agent played <B>."},
    {"role": "assistant", "content": "<B>"},
)


def probe_token_ids(tokenizer: Any) -> list[int]:
    """Token ids of the fixed probe chat, rendered with the tokenizer's chat template."""
    ids = tokenizer.apply_chat_template(list(PROBE_CHAT), tokenize=True, return_dict=False)
    return [int(i) for i in ids]


def lora_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if "lora_" in n]


def _gathered(model: torch.nn.Module, zero3: bool) -> contextlib.AbstractContextManager:
    if not zero3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(lora_parameters(model), modifier_rank=None)


def lora_state_dict(model: torch.nn.Module, zero3: bool = False) -> dict[str, torch.Tensor]:
    """PEFT adapter state dict, on CPU, contiguous (a collective call under ZeRO-3)."""
    from peft import get_peft_model_state_dict

    with _gathered(model, zero3):
        state = get_peft_model_state_dict(model)
        return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}


def adapter_config(model: torch.nn.Module, base_model_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """PEFT adapter_config.json as a dict (target modules as sorted leaf names)."""
    config = model.peft_config["default"].to_dict()
    targets = config.get("target_modules")
    if isinstance(targets, list | set | tuple):
        config["target_modules"] = sorted({str(t).rsplit(".", 1)[-1] for t in targets})
    config["base_model_name_or_path"] = str(base_model_dir)
    config["inference_mode"] = True
    return json.loads(json.dumps(config, default=lambda v: sorted(v) if isinstance(v, set) else str(v)))


@torch.no_grad()
def probe_logprobs(model: torch.nn.Module, token_ids: list[int]) -> tuple[float, ...]:
    """log pi(x_i | x_<i) for i = 1..n-1 with the adapter, temperature 1, unconstrained."""
    device = next(model.parameters()).device
    ids = torch.tensor([token_ids], dtype=torch.int64, device=device)
    was_training = model.training
    model.eval()
    logits = model(input_ids=ids).logits[0, :-1].float()
    model.train(was_training)
    logp = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
    return tuple(float(x) for x in logp.cpu())


def make_adapter_version(
    state: dict[str, torch.Tensor],
    config: dict[str, Any],
    *,
    name: str,
    version: int,
    probe: Probe | None = None,
) -> AdapterVersion:
    data = save_safetensors(state)
    return AdapterVersion(name, int(version), hashlib.sha256(data).hexdigest(), data, config, probe)


def export_adapter(
    model: torch.nn.Module,
    *,
    name: str,
    version: int,
    base_model_dir: str | os.PathLike[str],
    probe_ids: list[int] | None = None,
    zero3: bool = False,
) -> AdapterVersion:
    """Gather, serialise and probe the adapter of a PEFT model (single process / rank 0 view)."""
    state = lora_state_dict(model, zero3)
    probe = Probe(tuple(probe_ids), probe_logprobs(model, probe_ids)) if probe_ids else None
    return make_adapter_version(state, adapter_config(model, base_model_dir), name=name, version=version, probe=probe)


def load_adapter_weights(model: torch.nn.Module, data: bytes, zero3: bool = False) -> None:
    """Set a PEFT model's LoRA weights from safetensors bytes (exact: same keys, cast to dtype)."""
    from peft import set_peft_model_state_dict

    state = load_safetensors(data)
    with contextlib.ExitStack() as stack:
        if zero3:
            import deepspeed

            stack.enter_context(deepspeed.zero.GatheredParameters(lora_parameters(model), modifier_rank=0))
        result = set_peft_model_state_dict(model, state)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"adapter bytes hold keys the model lacks: {unexpected[:3]}")
