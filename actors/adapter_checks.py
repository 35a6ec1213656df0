"""Validate a LoRA adapter version against the served base model before an engine serves it.

vLLM checks little when it loads an adapter, and an adapter that fails inside a running batch kills
the whole engine (EngineDeadError). So every check that can be made from the bytes and the base
model's files is made here, in the calling process, and fails with an `AdapterError` that says
what is wrong: the safetensors bytes parse and hold finite LoRA A/B matrices only; the rank fits
the engine's `max_lora_rank`; every targeted module exists in the base model; A and B have the
shapes of the base model's layers; and `base_model_name_or_path` names the served model.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from actors.adapters import AdapterError, AdapterVersion

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.(?P<ab>lora_A|lora_B)\.weight$")


def read_safetensors_header(data: bytes, what: str = "safetensors") -> dict[str, tuple[str, tuple[int, ...]]]:
    """Parse a safetensors buffer's header: {tensor name: (dtype, shape)}. Checks that every tensor's
    byte range lies inside the buffer and matches its dtype and shape; raises AdapterError."""
    if len(data) < 8:
        raise AdapterError(f"{what}: {len(data)} bytes is too short to be safetensors")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise AdapterError(f"{what}: header length {n} exceeds the {len(data)} bytes")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(f"{what}: header is not valid JSON ({e})") from e
    if not isinstance(header, dict):
        raise AdapterError(f"{what}: header is not a JSON object")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise AdapterError(f"{what}: __metadata__ must map strings to strings")
    body = len(data) - 8 - n
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        out[name] = _check_entry(name, meta, body, what)
    return out


def _check_entry(name: str, meta: Any, body: int, what: str) -> tuple[str, tuple[int, ...]]:
    try:
        dtype, shape, (start, end) = meta["dtype"], meta["shape"], meta["data_offsets"]
        if not (isinstance(dtype, str) and isinstance(shape, list) and all(_count(x) for x in shape)
                and _count(start) and _count(end)):
            raise TypeError("dtype must be a string, shape and data_offsets non-negative integers")
        shape = tuple(shape)
    except (KeyError, TypeError, ValueError) as e:
        raise AdapterError(f"{what}: malformed header entry for {name}: {str(meta)[:200]}") from e
    size = _DTYPE_BYTES.get(dtype)
    if size is None:
        raise AdapterError(f"{what}: tensor {name} has unsupported dtype {dtype}")
    if not (0 <= start <= end <= body) or end - start != size * math.prod(shape):
        raise AdapterError(f"{what}: tensor {name} byte range [{start}, {end}) does not fit shape {shape} {dtype}")
    return dtype, shape


@dataclass(frozen=True)
class BaseModel:
    """What an adapter must fit: the served model's directory, config and linear-layer shapes."""

    path: Path
    config: dict[str, Any]
    weights: dict[str, tuple[int, ...]]  # parameter name -> shape, e.g. model.layers.0.mlp.up_proj.weight
    aliases: frozenset[str]  # accepted values of an adapter's base_model_name_or_path

    @classmethod
    def from_dir(cls, path: str | Path, aliases: Iterable[str] = ()) -> BaseModel:
        """Read config.json and the safetensors headers (not the tensors) of a HF model directory."""
        path = Path(path).resolve()
        config = json.loads((path / "config.json").read_text())
        weights: dict[str, tuple[int, ...]] = {}
        for f in sorted(path.glob("*.safetensors")):
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                head = fh.read(n)
            for name, meta in json.loads(head).items():
                if name != "__metadata__":
                    weights[name] = tuple(meta["shape"])
        if not weights:
            raise AdapterError(f"base model {path} has no safetensors weights")
        names = {str(path), path.name, *aliases}
        return cls(path, config, weights, frozenset(names))

    def accepts_name(self, name: str | None) -> bool:
        """An adapter's base_model_name_or_path fits when empty, the served path, or its directory
        name (the same export checked out elsewhere), or one of the configured aliases."""
        if not name:
            return True
        return name in self.aliases or Path(name).name in self.aliases or _resolves_to(name, self.path)


def _resolves_to(name: str, path: Path) -> bool:
    try:
        return Path(name).resolve() == path
    except OSError:
        return False


def check_adapter(version: AdapterVersion, base: BaseModel, max_rank: int) -> dict[str, int]:
    """Validate a version's config and tensors against `base`; return {module: rank}. Raises
    AdapterError naming the first problem found."""
    version.check_sha()
    what = f"adapter {version.key}"
    cfg = version.config
    _check_config(cfg, base, what)
    tensors = read_safetensors_header(version.data, what)
    ranks = _check_shapes(tensors, base, cfg, what)
    too_big = {m: r for m, r in ranks.items() if r > max_rank}
    if too_big:
        m, r = next(iter(too_big.items()))
        raise AdapterError(f"{what}: rank {r} (module {m}) exceeds the engine's max_lora_rank {max_rank}")
    _check_targets(cfg, ranks, base, what)
    _check_finite(version.data, what)
    return ranks


def _count(x: Any) -> bool:
    """A non-negative integer (JSON numbers only: not a bool, not a float)."""
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _positive_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def _check_types(cfg: Any, what: str) -> None:
    """The config's fields the engine reads have the types PEFT writes (a malformed config must
    fail here with a clear message, not as a TypeError deep in a check or in vLLM's worker)."""
    if not isinstance(cfg, dict):
        raise AdapterError(f"{what}: adapter_config is a {type(cfg).__name__}, not a JSON object")
    problems = []
    if not (_count(cfg.get("r")) and cfg["r"] >= 1):
        problems.append(f"r={cfg.get('r')!r} (a positive integer)")
    if not _positive_number(cfg.get("lora_alpha")):
        problems.append(f"lora_alpha={cfg.get('lora_alpha')!r} (a positive number)")
    targets = cfg.get("target_modules")
    if not (isinstance(targets, str) or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))):
        problems.append(f"target_modules={targets!r} (a regex string or a list of module names)")
    for key, ok in (("rank_pattern", lambda v: _count(v) and v >= 1), ("alpha_pattern", _positive_number)):
        pattern = cfg.get(key) or {}
        if not (isinstance(pattern, dict) and all(isinstance(k, str) and ok(v) for k, v in pattern.items())):
            problems.append(f"{key}={pattern!r} (module pattern -> positive number)")
    for key in ("base_model_name_or_path", "peft_type", "bias"):
        if cfg.get(key) is not None and not isinstance(cfg[key], str):
            problems.append(f"{key}={cfg[key]!r} (a string)")
    if problems:
        raise AdapterError(f"{what}: malformed adapter_config: {'; '.join(problems)}"[:600])
    for regex in ([targets] if isinstance(targets, str) else []) + list(cfg.get("rank_pattern") or {}) + list(
            cfg.get("alpha_pattern") or {}):
        try:
            re.compile(regex)
        except re.error as e:
            raise AdapterError(f"{what}: adapter_config pattern {regex!r} is not a valid regex: {e}") from e


def _check_config(cfg: dict[str, Any], base: BaseModel, what: str) -> None:
    _check_types(cfg, what)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{what}: peft_type {cfg.get('peft_type')!r} is not LORA")
    for flag in (
        "use_dora",
        "use_qalora",
        "fan_in_fan_out",
        "lora_bias",
        "layer_replication",
        "alora_invocation_tokens",
    ):
        if cfg.get(flag):
            raise AdapterError(f"{what}: {flag}=true is not supported by the engine")
    if cfg.get("modules_to_save"):
        raise AdapterError(f"{what}: modules_to_save {cfg['modules_to_save']} cannot be served (LoRA A/B only)")
    if cfg.get("bias", "none") != "none":
        raise AdapterError(f"{what}: bias={cfg['bias']!r} is not supported (use 'none')")
    name = cfg.get("base_model_name_or_path")
    if not base.accepts_name(name):
        raise AdapterError(f"{what}: built for base model {name!r}, but this engine serves {base.path}")


def _check_shapes(
    tensors: dict[str, tuple[str, tuple[int, ...]]], base: BaseModel, cfg: dict[str, Any], what: str
) -> dict[str, int]:
    """Each LoRA pair must sit on a base linear layer W [out, in]: A [r, in], B [out, r]."""
    pairs: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, (_, shape) in tensors.items():
        m = _LORA_KEY.match(name)
        if m is None:
            raise AdapterError(f"{what}: unexpected tensor {name} (only PEFT lora_A/lora_B weights can be served)")
        pairs.setdefault(m["module"], {})[m["ab"]] = shape
    if not pairs:
        raise AdapterError(f"{what}: no LoRA tensors in the safetensors file")
    ranks: dict[str, int] = {}
    for module, ab in sorted(pairs.items()):
        w = base.weights.get(f"{module}.weight")
        if w is None:
            raise AdapterError(f"{what}: module {module} does not exist in the base model {base.path.name}")
        if set(ab) != {"lora_A", "lora_B"} or len(w) != 2:
            raise AdapterError(f"{what}: module {module} needs 2-d lora_A and lora_B, has {sorted(ab)}")
        a, b = ab["lora_A"], ab["lora_B"]
        r = a[0] if a else 0
        if r < 1 or a != (r, w[1]) or b != (w[0], r):
            raise AdapterError(
                f"{what}: shape mismatch at {module}: lora_A {list(a)}, lora_B {list(b)} do not fit the base "
                f"layer [out={w[0]}, in={w[1]}] (adapter built for another base model?)"
            )
        ranks[module] = r
    expected = cfg.get("rank_pattern") or {}
    for module, r in ranks.items():
        want = next((v for k, v in expected.items() if re.match(rf"(.*\.)?({k})$", module)), cfg["r"])
        if r != want:
            raise AdapterError(f"{what}: module {module} has rank {r} but the config says {want}")
    return ranks


def _check_targets(cfg: dict[str, Any], ranks: dict[str, int], base: BaseModel, what: str) -> None:
    """Every configured target must name modules of the base model, and every tensor a target."""
    targets = cfg.get("target_modules")
    modules = [n[: -len(".weight")] for n, s in base.weights.items() if n.endswith(".weight") and len(s) == 2]
    if isinstance(targets, str):
        if not any(re.fullmatch(targets, m) for m in modules):
            raise AdapterError(f"{what}: target_modules regex {targets!r} matches no module of the base model")
        return
    if not targets:
        raise AdapterError(f"{what}: config has no target_modules")
    for t in targets:
        if not any(m == t or m.endswith("." + t) for m in modules):
            raise AdapterError(f"{what}: target module {t!r} does not exist in the base model {base.path.name}")
    for module in ranks:
        if not any(module == t or module.endswith("." + t) for t in targets):
            raise AdapterError(f"{what}: tensors for {module}, which target_modules does not name")


def _check_finite(data: bytes, what: str) -> None:
    """Load the tensors (small) and reject NaN/Inf: a diverged update must not reach the engine."""
    import torch
    from safetensors.torch import load

    try:
        tensors = load(data)
    except Exception as e:  # safetensors raises its own SafetensorError
        raise AdapterError(f"{what}: safetensors does not parse: {e}") from e
    for name, t in tensors.items():
        if not bool(torch.isfinite(t).all()):
            raise AdapterError(f"{what}: tensor {name} holds NaN or Inf")
