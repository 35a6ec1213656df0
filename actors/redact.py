"""Secrets never leave the process that holds them: redaction for logs, MLflow params and transcripts.

API keys come only from environment variables (`APIConfig.api_key_env` names the variable; a config
that holds a key itself is refused). Whatever text leaves a process (an error message, a log line,
an MLflow param or artifact, a transcript) goes through `redact_text`, which removes
- the values of environment variables whose *name* looks secret (`*_API_KEY`, `*_TOKEN`,
  `*SECRET*`, `*PASSWORD*`, ...), and any value registered with `register_secret`;
- `Bearer <token>` / `Authorization: <...>` headers, `sk-...`-style keys, credentials in URLs
  (`https://user:pass@host`) and key-like query parameters (`?api_key=...`, `&token=...`);
- the value of a `name: value` / `name=value` line or a `"name": "value"` JSON pair whose name
  looks secret (so a YAML config or an env dump keeps its shape, not its secrets).
`redact_mapping` also blanks the value of every key whose name looks secret (`api_key`, `token`,
`password`, ...); names ending in `_env` hold a variable's name, not a secret, and are kept.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

MASK = "***"
MIN_SECRET_CHARS = 6  # shorter values (e.g. "1", "true") are not treated as secrets: too many false hits

_SECRET_WORDS = frozenset({"secret", "token", "password", "passwd", "pwd", "passphrase", "credential", "credentials",
                           "authorization", "apikey", "bearer"})
_KEY_QUALIFIERS = frozenset({"api", "access", "private", "secret", "session", "signing", "encryption", "auth"})
_WORD = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])")
_PATTERNS = (
    # Authorization headers and bearer tokens
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{8,}"), r"\1 " + MASK),
    (re.compile(r"(?i)(authorization[\"']?\s*[:=]\s*[\"']?)(?!(?:bearer|basic)\s)[^\s,;'\"}]+"), r"\1" + MASK),
    # OpenAI/Anthropic/HF-style keys
    (re.compile(r"\b(sk|rk|pk)-[A-Za-z0-9_-]{10,}"), MASK),
    (re.compile(r"\bhf_[A-Za-z0-9]{10,}"), MASK),
    # user:password@ in URLs
    (re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s:@]+:[^/\s@]+@"), r"\1" + MASK + "@"),
    # ?api_key=... &token=... in URLs or forms
    (re.compile(r"(?i)([?&;](?:api[_-]?key|apikey|key|token|access[_-]?token|secret|password|sig)=)[^&\s#'\"]+"),
     r"\1" + MASK),
)
# `name: value` / `name=value` lines (YAML, env files, logs) and `"name": "value"` JSON pairs; the
# value is masked when the name looks secret (checked in code: `max_tokens: 16` is kept).
_ASSIGNMENT = re.compile(r"(?m)^(\s*(?:-\s+)?[\"']?)([A-Za-z_][\w.-]*)([\"']?[ \t]*[:=][ \t]*)([^\s#][^\n]*)$")
_JSON_PAIR = re.compile(r"(\"([A-Za-z_][\w.-]*)\"\s*:\s*)\"((?:[^\"\\]|\\.)+)\"")
_EMPTY = frozenset({"null", "~", "''", '""', "none", "None"})
_registered: set[str] = set()


def is_secret_name(name: str) -> bool:
    """Whether a config key or environment variable name looks like it holds a secret: one of its
    words is secret/token/password/credential(s)/authorization/..., or it is a qualified key
    (api_key, ACCESS_KEY, private-key). `max_tokens`, `keep`, `api_key_env` (a variable's name) are not."""
    words = [w.lower() for w in _WORD.findall(str(name))]
    if not words or words[-1] == "env":
        return False
    if any(w in _SECRET_WORDS for w in words):
        return True
    return any(w == "key" and i > 0 and words[i - 1] in _KEY_QUALIFIERS for i, w in enumerate(words))


def register_secret(value: str | None) -> None:
    """Redact this exact value wherever it appears from now on (e.g. an API key read from the env)."""
    if value and len(value) >= MIN_SECRET_CHARS:
        _registered.add(value)


def secret_values(environ: Mapping[str, str] | None = None) -> set[str]:
    """Registered secrets plus the values of secret-named environment variables."""
    env = _environ() if environ is None else environ
    values = {v for k, v in env.items() if is_secret_name(k) and _looks_secret(v)}
    return values | _registered


def _environ() -> dict[str, str]:
    """A copy of os.environ. Iterating os.environ itself races with threads that unset variables
    (MLflow's telemetry removes `_MLFLOW_TELEMETRY_SESSION_ID`): a key listed, then gone, is a
    KeyError. Copy again when that happens."""
    for _ in range(100):
        try:
            return dict(os.environ)
        except KeyError:
            continue
    return dict(os.environ)


def _looks_secret(value: str) -> bool:
    """An environment value worth redacting: long enough and not a plain word such as 'disabled'."""
    return len(value) >= 8 and any(c.isdigit() for c in value)


def redact_text(text: Any, extra: Iterable[str] = ()) -> str:
    """`text` (str()-ed) with secrets replaced by ***; see the module doc for what counts."""
    out = str(text)
    for secret in sorted({*secret_values(), *(e for e in extra if e and len(e) >= MIN_SECRET_CHARS)}, key=len,
                         reverse=True):
        if secret in out:
            out = out.replace(secret, MASK)
    for pattern, repl in _PATTERNS:
        out = pattern.sub(repl, out)
    out = _ASSIGNMENT.sub(_mask_assignment, out)
    return _JSON_PAIR.sub(lambda m: f'{m[1]}"{MASK}"' if is_secret_name(m[2]) else m[0], out)


def _mask_assignment(m: re.Match[str]) -> str:
    if not is_secret_name(m[2]) or m[4].strip() in _EMPTY or m[4].strip() == MASK:
        return m[0]
    return f"{m[1]}{m[2]}{m[3]}{MASK}"


def redact_mapping(obj: Any) -> Any:
    """A copy of a (nested) dict/list with secret-named keys blanked and every string redacted."""
    if isinstance(obj, Mapping):
        return {
            k: (MASK if is_secret_name(str(k)) and v not in (None, "") else redact_mapping(v)) for k, v in obj.items()
        }
    if isinstance(obj, list | tuple):
        return type(obj)(redact_mapping(v) for v in obj)
    if isinstance(obj, str):
        return redact_text(obj)
    return obj


class RedactingFilter(logging.Filter):
    """A logging filter that redacts each record's message (install on a handler or logger)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: leave it to the handler
            return True
        clean = redact_text(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


def install_log_redaction(logger: logging.Logger | None = None) -> RedactingFilter:
    """Add a RedactingFilter to `logger` (default: the root logger) and to its handlers; idempotent."""
    logger = logger or logging.getLogger()
    for f in logger.filters:
        if isinstance(f, RedactingFilter):
            return f
    flt = RedactingFilter()
    logger.addFilter(flt)
    for h in logger.handlers:
        if not any(isinstance(f, RedactingFilter) for f in h.filters):
            h.addFilter(flt)
    return flt
