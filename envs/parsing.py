"""Output formats of the three games: guided-decoding regexes, parsers and formatters.

Every parser takes any string and never raises; it returns the action the env applies and whether
the text was valid. What counts as valid (spec section 2; choices marked (ours) in sysdesign/games.md):
- IPD: the text, stripped of surrounding whitespace, is exactly one of the two labels; anything
  else is invalid and played as defect.
- Split: case-insensitive; the part after the last `Proposal:` is searched for `<n> hats`, `<n> books`,
  `<n> balls` (n in 0..10, first match per item); unmentioned items are 0; no `Proposal:` or no item
  at all -> all 0, invalid.
- Trust-and-Split message: the last `<<message_start>>...<<message_end>>` pair with no message tag
  inside; the content is stripped and cut to 500 characters (counted, still valid). Without the
  pair the message is invalid and the whole text, tags removed, is delivered instead (ours). The cap
  is the game's `message_chars` option (default 500, the spec's; CPU configs use less).
- Trust-and-Split proposal: the last `<<proposal_start>> x <<proposal_end>>` with x in 0..10
  (whitespace around x free); else invalid and played as 0 coins (ours).
"""

from __future__ import annotations

import re
from collections import deque


def _last(pattern: re.Pattern[str], text: str) -> re.Match[str] | None:
    """The last non-overlapping match of `pattern` in `text`."""
    found = deque(pattern.finditer(text), maxlen=1)
    return found[0] if found else None


# -- IPD -----------------------------------------------------------------------------------------
IPD_LABELS = {"neutral": ("<A>", "<B>"), "overt": ("<Cooperate>", "<Defect>")}  # (cooperate, defect)


def ipd_regex(labels: tuple[str, str]) -> str:
    return f"({re.escape(labels[0])}|{re.escape(labels[1])})"


def parse_ipd(text: str, labels: tuple[str, str] = IPD_LABELS["neutral"]) -> tuple[str, bool]:
    """-> ("C" | "D", valid). Invalid text plays defect."""
    answer = text.strip()
    if answer == labels[0]:
        return "C", True
    return "D", answer == labels[1]


# -- Split No-Comm -------------------------------------------------------------------------------
SPLIT_ITEMS = ("hats", "books", "balls")
SPLIT_REGEX = "Proposal: (10|[0-9]) hats, (10|[0-9]) books, (10|[0-9]) balls"
_SPLIT_EXACT = re.compile(rf"\s*{SPLIT_REGEX}\s*")  # fast path for the canonical form
_SPLIT_KEY = re.compile(r"proposal\s*:", re.IGNORECASE)
_SPLIT_ITEM = {item: re.compile(rf"(?<![0-9])(10|[0-9])\s*{item[:-1]}s?\b", re.IGNORECASE) for item in SPLIT_ITEMS}


def format_split(units: tuple[int, int, int] | list[int]) -> str:
    return f"Proposal: {units[0]} hats, {units[1]} books, {units[2]} balls"


def parse_split(text: str) -> tuple[tuple[int, int, int], bool]:
    """-> ((hats, books, balls), valid). No match -> (0, 0, 0), invalid."""
    exact = _SPLIT_EXACT.fullmatch(text)
    if exact:
        return (int(exact[1]), int(exact[2]), int(exact[3])), True
    key = _last(_SPLIT_KEY, text)
    if key is None:
        return (0, 0, 0), False
    rest = text[key.end() :]
    found = [_SPLIT_ITEM[item].search(rest) for item in SPLIT_ITEMS]
    units = tuple(int(m.group(1)) if m else 0 for m in found)
    return (units[0], units[1], units[2]), any(found)


# -- Trust-and-Split -----------------------------------------------------------------------------
MESSAGE_CHARS = 500
MESSAGE_START, MESSAGE_END = "<<message_start>>", "<<message_end>>"
PROPOSAL_START, PROPOSAL_END = "<<proposal_start>>", "<<proposal_end>>"


def message_regex(chars: int = MESSAGE_CHARS) -> str:
    """The guided format of a message of at most `chars` characters (MESSAGE_REGEX at the default)."""
    return f"{MESSAGE_START}[^<>]{{0,{int(chars)}}}{MESSAGE_END}"


MESSAGE_REGEX = message_regex()
PROPOSAL_REGEX = f"{PROPOSAL_START} (10|[0-9]) {PROPOSAL_END}"
_MESSAGE = re.compile(rf"{MESSAGE_START}((?:(?!{MESSAGE_START}|{MESSAGE_END}).)*){MESSAGE_END}", re.DOTALL)
_PROPOSAL = re.compile(rf"{PROPOSAL_START}\s*(10|[0-9])\s*{PROPOSAL_END}")
_TAGS = re.compile("|".join(map(re.escape, (MESSAGE_START, MESSAGE_END, PROPOSAL_START, PROPOSAL_END))))
HANDS = ("rock", "paper", "scissors")  # HANDS[i] beats HANDS[(i + 2) % 3]
_HAND_WORD = re.compile(r"\b(rock|paper|scissors)\b", re.IGNORECASE)
_INT_WORD = re.compile(r"(?<![0-9])([0-9]{1,2})(?![0-9])")


def format_message(content: str) -> str:
    return f"{MESSAGE_START}{content}{MESSAGE_END}"


def format_proposal(coins: int) -> str:
    return f"{PROPOSAL_START} {coins} {PROPOSAL_END}"


def parse_message(text: str, chars: int = MESSAGE_CHARS) -> tuple[str, bool, bool]:
    """-> (delivered content, valid, truncated): content beyond `chars` characters is cut."""
    match = _last(_MESSAGE, text)
    valid = match is not None
    content = match.group(1) if match else _TAGS.sub("", text)
    content = content.strip()
    truncated = len(content) > chars
    return (content[:chars].strip() if truncated else content), valid, truncated


def parse_proposal(text: str) -> tuple[int, bool]:
    """-> (coins kept, valid). Invalid plays 0 coins."""
    match = _last(_PROPOSAL, text)
    return (int(match.group(1)), True) if match else (0, False)


def claimed_hand(message: str) -> str | None:
    """The one RPS hand a message names (case-insensitive whole word), None if none or several."""
    hands = {m.lower() for m in _HAND_WORD.findall(message)}
    return hands.pop() if len(hands) == 1 else None


def claimed_value(message: str) -> int | None:
    """The one integer in 1..20 a message names, None if none or several distinct ones."""
    values = {int(m) for m in _INT_WORD.findall(message)}
    values &= set(range(1, 21))
    return values.pop() if len(values) == 1 else None
