"""Guided decisions: recompute the engine's grammar constraint so the learner's log-probs match it.

A guided sample is drawn from the *constrained* distribution: vLLM fills an xgrammar token bitmask
for the decision's regex, sets the logits of disallowed tokens to -inf, then divides by the
temperature and samples (its `processed_logprobs` are log-probs of that distribution). For the
importance weight rho = pi / pi_engine and the policy gradient to compare like with like, the
learner applies the same constraint:

    log pi_c(y_i | x, y_<i) = z_i[y_i] - logsumexp_{v in allowed_i} z_i[v],   z_i = logits_i / T

where allowed_i is the set of tokens the grammar matcher allows after the accepted prefix y_<i.
A token that the grammar forces (one allowed token) gets log pi_c = 0 and no gradient.

The constraint is rebuilt with the same library and settings vLLM uses: xgrammar's
``TokenizerInfo.from_huggingface(tokenizer, vocab_size=<model vocab>)``, ``compile_regex`` and a
``GrammarMatcher`` whose stop tokens are vLLM's (the tokenizer's eos plus the generation config's
eos ids). The matcher walks the accepted generated ids; the bitmask before each id is that
position's constraint.

Masks are cached in a prefix trie per regex: node (regex, prefix) -> mask id, so the thousands of
identical IPD decisions (`<A>` / `<B>` then eos) cost one walk each, and each distinct bitmask is
stored once. Masks stay packed (int32, 32 tokens per word, xgrammar's layout) until a micro-batch
unpacks the ones it needs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

UNCONSTRAINED = -1  # mask id of a token that is not constrained


class Constrainer:
    """Per-token allowed-token bitmasks of guided decisions, as vLLM's xgrammar backend builds them."""

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        stop_token_ids: Sequence[int] | None = None,
    ) -> None:
        import xgrammar as xgr

        self._xgr = xgr
        self.vocab_size = int(vocab_size)
        self.stop_token_ids = sorted(set(stop_token_ids)) if stop_token_ids else None
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=self.vocab_size)
        self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=True)
        self._grammars: dict[str, Any] = {}
        self._masks: list[np.ndarray] = []  # unique packed bitmasks, [words] int32 each
        self._mask_id: dict[bytes, int] = {}
        # prefix trie: root node per regex; (node, token) -> child node; node -> mask id at that node
        self._roots: dict[str, int] = {}
        self._children: dict[tuple[int, int], int] = {}
        self._node_mask: list[int] = []
        self._node_terminal: list[bool] = []
        self.n_rejected = 0  # guided tokens the grammar did not accept (left unconstrained)
        self.n_after_stop = 0  # tokens after the matcher terminated (left unconstrained)

    @classmethod
    def from_model_dir(cls, model_dir: str | os.PathLike[str], tokenizer: Any | None = None) -> Constrainer:
        """Tokenizer, model vocab size and vLLM's stop tokens (eos + generation_config eos) of a dir."""
        from transformers import AutoConfig, AutoTokenizer

        model_dir = Path(model_dir)
        tok = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(str(model_dir))
        vocab = AutoConfig.from_pretrained(str(model_dir)).vocab_size
        return cls(tok, vocab, stop_token_ids=vllm_stop_token_ids(model_dir, tok))

    @property
    def words(self) -> int:
        """int32 words per packed bitmask: ceil(vocab_size / 32)."""
        return (self.vocab_size + 31) // 32

    def _grammar(self, regex: str) -> Any:
        if regex not in self._grammars:
            self._grammars[regex] = self._compiler.compile_regex(regex)
        return self._grammars[regex]

    def _new_node(self) -> int:
        self._node_mask.append(UNCONSTRAINED)
        self._node_terminal.append(False)
        return len(self._node_mask) - 1

    def _store(self, packed: np.ndarray) -> int:
        key = packed.tobytes()
        if key not in self._mask_id:
            self._mask_id[key] = len(self._masks)
            self._masks.append(packed.copy())
        return self._mask_id[key]

    def decision_masks(self, regex: str, token_ids: Sequence[int]) -> list[int]:
        """Mask id (into :meth:`bitmasks`) for each generated token of one guided decision.

        Position i's mask is the set of tokens allowed after ``token_ids[:i]``. A token the
        grammar rejects, and every token after it or after the matcher terminated, gets
        UNCONSTRAINED (counted in ``n_rejected`` / ``n_after_stop``): vLLM would never have
        produced them, so they indicate a rollout/learner mismatch, not a crash.
        """
        if regex not in self._roots:
            self._roots[regex] = self._new_node()
        node = self._roots[regex]
        out: list[int] = []
        matcher = None
        walked = 0  # tokens already fed to `matcher`
        for i, tok in enumerate(token_ids):
            if self._node_terminal[node]:
                self.n_after_stop += len(token_ids) - i
                out.extend([UNCONSTRAINED] * (len(token_ids) - i))
                return out
            if self._node_mask[node] == UNCONSTRAINED:  # first visit: walk a matcher to this prefix
                if matcher is None:
                    matcher = self._matcher(regex)
                for t in token_ids[walked:i]:
                    matcher.accept_token(int(t))
                walked = i
                bitmask = self._xgr.allocate_token_bitmask(1, self.vocab_size)
                matcher.fill_next_token_bitmask(bitmask, 0)
                self._node_mask[node] = self._store(bitmask[0].numpy())
            mask_id = self._node_mask[node]
            if not _allowed(self._masks[mask_id], int(tok)):
                self.n_rejected += len(token_ids) - i
                out.extend([UNCONSTRAINED] * (len(token_ids) - i))
                return out
            out.append(mask_id)
            child = self._children.get((node, int(tok)))
            if child is None:
                child = self._new_node()
                self._children[(node, int(tok))] = child
                if matcher is None:
                    matcher = self._matcher(regex)
                for t in token_ids[walked : i + 1]:
                    matcher.accept_token(int(t))
                walked = i + 1
                self._node_terminal[child] = matcher.is_terminated()
            node = child
        return out

    def _matcher(self, regex: str) -> Any:
        return self._xgr.GrammarMatcher(self._grammar(regex), override_stop_tokens=self.stop_token_ids)

    def bitmasks(self, mask_ids: Sequence[int] | None = None) -> torch.Tensor:
        """Packed bitmasks [n, words] int32 (all, or the given ids in order)."""
        ids = range(len(self._masks)) if mask_ids is None else mask_ids
        if not len(ids):
            return torch.zeros((0, self.words), dtype=torch.int32)
        return torch.from_numpy(np.stack([self._masks[i] for i in ids]))


def _allowed(packed: np.ndarray, token: int) -> bool:
    return bool((int(packed[token >> 5]) >> (token & 31)) & 1)


def unpack_bitmask(packed: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[n, words] int32 (bit j of word w = token 32*w + j) -> [n, vocab_size] bool allowed-mask."""
    shifts = torch.arange(32, dtype=torch.int32, device=packed.device)
    bits = (packed.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(packed.shape[0], -1)[:, :vocab_size].bool()


def vllm_stop_token_ids(model_dir: str | os.PathLike[str], tokenizer: Any) -> list[int]:
    """The stop tokens vLLM gives a request's grammar matcher: the tokenizer's eos plus the
    generation config's eos ids (``SamplingParams.all_stop_token_ids`` with no extra stop ids)."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen = Path(model_dir) / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        if eos is not None:
            ids.update([eos] if isinstance(eos, int) else eos)
    return sorted(ids)
