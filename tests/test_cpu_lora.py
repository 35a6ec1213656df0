"""The engine's CPU LoRA op (`grouped_add_lora_linear`, installed into vLLM's PunicaWrapperCPU by
CPULoRAFix): pure tensor logic, checked against the per-token formula and, bitwise, against the
first version's arithmetic (one concatenated delta per slot, advanced indexing), which it replaced
for speed without changing a number."""

from __future__ import annotations

import types
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.vllm_engine import grouped_add_lora_linear, slot_rows

SLOTS, RANK = 3, 4


def first_version(self: Any, y: Any, x: Any, lora_a: Any, lora_b: Any, scale: float, output_slices: Any) -> None:
    """The op as first written (session 4): the arithmetic the new one must reproduce bit for bit."""
    x2, y2 = x.view(-1, x.shape[-1]), y.view(-1, y.shape[-1])
    idx = self.token_lora_indices[: x2.shape[0]]
    for slot in torch.unique(idx).tolist():
        if slot < 0:
            continue
        mask = idx == slot
        rows = None if bool(mask.all()) else mask.nonzero().squeeze(1)
        xs = (x2 if rows is None else x2[rows]).float()
        pairs = zip(lora_a, lora_b, strict=True)
        parts = [((xs @ a[slot, 0].float().T) * scale) @ b[slot, 0].float().T for a, b in pairs]
        delta = torch.cat(parts, 1).to(y2.dtype)
        width = sum(output_slices)
        if rows is None:
            y2[:, :width] += delta
        else:
            y2[rows, :width] += delta


def layer(seed: int, inp: int, outs: tuple[int, ...], tokens: int) -> tuple[Any, ...]:
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(torch.bfloat16)

    lora_a = tuple(randn(SLOTS, 1, RANK, inp) * 0.1 for _ in outs)
    lora_b = tuple(randn(SLOTS, 1, o, RANK) * 0.1 for o in outs)
    return randn(tokens, inp), randn(tokens, sum(outs)), lora_a, lora_b


def per_token(y: Any, x: Any, lora_a: Any, lora_b: Any, scale: float, indices: list[int]) -> torch.Tensor:
    """y[t] += (x[t] A_s^T * scale) B_s^T for each token t of slot s >= 0, token by token, in fp32."""
    out = y.clone()
    for t, s in enumerate(indices):
        if s < 0:
            continue
        xt = x[t : t + 1].float()
        pairs = zip(lora_a, lora_b, strict=True)
        delta = torch.cat([((xt @ a[s, 0].float().T) * scale) @ b[s, 0].float().T for a, b in pairs], 1)
        out[t, : delta.shape[1]] = (out[t, : delta.shape[1]].float() + delta[0]).to(y.dtype)
    return out


indices_lists = st.lists(st.integers(min_value=-1, max_value=SLOTS - 1), min_size=1, max_size=40)


@settings(max_examples=60, deadline=None)
@given(indices=indices_lists, outs=st.sampled_from([(24,), (24, 8, 8), (40, 40)]), seed=st.integers(0, 2**16))
def test_same_bits_as_the_first_version_and_the_per_token_formula(indices: list[int], outs: tuple[int, ...],
                                                                  seed: int) -> None:
    x, y, lora_a, lora_b = layer(seed, 16, outs, len(indices))
    wrapper = types.SimpleNamespace(token_lora_indices=torch.tensor(indices))
    new, old = y.clone(), y.clone()
    grouped_add_lora_linear(wrapper, new, x, lora_a, lora_b, 2.0, outs)
    first_version(wrapper, old, x, lora_a, lora_b, 2.0, outs)
    assert torch.equal(new, old)
    base = [t for t, s in enumerate(indices) if s < 0]
    assert torch.equal(new[base], y[base])  # base-model tokens get no LoRA (vLLM's own op gave them the last slot)
    torch.testing.assert_close(new, per_token(y, x, lora_a, lora_b, 2.0, indices), atol=2e-2, rtol=2e-2)


def test_slot_rows_groups_tokens_by_slot() -> None:
    groups = dict(slot_rows(torch.tensor([2, -1, 0, 2, 0, -1])))
    assert groups.keys() == {0, 2}
    assert groups[0].tolist() == [2, 4] and groups[2].tolist() == [0, 3]
    only = slot_rows(torch.tensor([1, 1, 1]))
    assert only == [(1, None)]  # every token on one slot: no gather
    assert slot_rows(torch.tensor([-1, -1])) == []


@pytest.mark.parametrize("hooked", [True, False])
def test_rows_are_found_once_per_step_and_forgotten_by_the_metadata_hook(hooked: bool) -> None:
    """With the metadata hook installed (the wrapper carries `reciprocity_slot_rows`), one step's
    LoRA layers share the grouping and the next step (hook sets it to None) regroups; without the
    hook nothing is cached."""
    outs = (24,)
    first, second = [0, 0, 1, -1], [1, -1, 0, 0]
    x, y, lora_a, lora_b = layer(7, 16, outs, 4)
    wrapper = types.SimpleNamespace(token_lora_indices=torch.tensor(first))
    if hooked:
        wrapper.reciprocity_slot_rows = None
    grouped_add_lora_linear(wrapper, y.clone(), x, lora_a, lora_b, 2.0, outs)
    if hooked:
        assert wrapper.reciprocity_slot_rows[0] == 4 and [s for s, _ in wrapper.reciprocity_slot_rows[1]] == [0, 1]
        wrapper.reciprocity_slot_rows = None  # what update_metadata_forget_slots does after vLLM's update
    else:
        assert not hasattr(wrapper, "reciprocity_slot_rows")
    wrapper.token_lora_indices = torch.tensor(second)
    new = y.clone()
    grouped_add_lora_linear(wrapper, new, x, lora_a, lora_b, 2.0, outs)
    torch.testing.assert_close(new, per_token(y, x, lora_a, lora_b, 2.0, second), atol=2e-2, rtol=2e-2)
    assert torch.equal(new[1], y[1])  # the second step's base token, untouched


def test_fp32_weights_are_kept_until_vllm_writes_the_slot() -> None:
    """Each slot's fp32 A and B are converted once and reused, until an in-place write to the stacked
    tensor (vLLM's `set_lora` copies a new adapter into a slot, `reset_lora` zeroes one, under
    inference mode): the next call must then compute with the new weights, bit for bit as the first
    version does."""
    outs = (24, 8, 8)
    x, y, lora_a, lora_b = layer(11, 16, outs, 6)
    indices = [0, 1, 1, -1, 0, 2]
    wrapper = types.SimpleNamespace(token_lora_indices=torch.tensor(indices), reciprocity_slot_rows=None)

    def step() -> torch.Tensor:
        wrapper.reciprocity_slot_rows = None  # a new engine step
        new, old = y.clone(), y.clone()
        grouped_add_lora_linear(wrapper, new, x, lora_a, lora_b, 2.0, outs)
        first_version(wrapper, old, x, lora_a, lora_b, 2.0, outs)
        assert torch.equal(new, old)
        return new

    before = step()
    kept = {key: entry[2] for key, entry in wrapper.reciprocity_fp32.items()}
    assert len(kept) == 2 * len(outs) * 3  # A and B of every slice, for the 3 slots present
    step()
    assert all(wrapper.reciprocity_fp32[key][2] is weights for key, weights in kept.items())  # reused

    g = torch.Generator().manual_seed(99)
    with torch.inference_mode():  # as vLLM loads an adapter into slot 1
        lora_b[0][1, 0, :, :].copy_(torch.randn(outs[0], RANK, generator=g).to(torch.bfloat16))
        lora_a[2][2] = 0  # as vLLM's reset_lora empties slot 2
    after = step()
    slot1 = [t for t, s in enumerate(indices) if s == 1]
    slot2 = [t for t, s in enumerate(indices) if s == 2]
    assert not torch.equal(after[slot1, : outs[0]], before[slot1, : outs[0]])  # the new adapter serves
    assert torch.equal(after[slot2, 24 + 8:], y[slot2, 24 + 8:])  # the emptied slice adds nothing
    assert torch.equal(after[[0, 4]], before[[0, 4]])  # slot 0, not written, unchanged


def test_tensors_without_a_version_counter_are_converted_on_every_call() -> None:
    """Stacked tensors made in inference mode have no version counter, so a write could not be seen:
    nothing is kept, and the numbers are the first version's."""
    outs = (24,)
    with torch.inference_mode():
        x, y, lora_a, lora_b = layer(5, 16, outs, 4)
        wrapper = types.SimpleNamespace(token_lora_indices=torch.tensor([0, 1, 1, 0]))
        new, old = y.clone(), y.clone()
        grouped_add_lora_linear(wrapper, new, x, lora_a, lora_b, 2.0, outs)
        first_version(wrapper, old, x, lora_a, lora_b, 2.0, outs)
    assert torch.equal(new, old)
    assert not getattr(wrapper, "reciprocity_fp32", {})
