"""Parser fuzzing: no input ever raises, and valid outputs always parse to the intended action.

One Hypothesis test runs 10,000 drawn texts through every parser's check (Hypothesis' per-example
cost, about 1 ms, dominates; the parsers take microseconds). Each check uses the text itself as
junk input, then frames a valid output with it (as prefix and, sanitised, as suffix) whose intended
action is derived from the text.
"""

from __future__ import annotations

import itertools
import re
import time
import zlib

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from envs.parsing import (
    IPD_LABELS,
    MESSAGE_END,
    MESSAGE_REGEX,
    MESSAGE_START,
    PROPOSAL_END,
    PROPOSAL_REGEX,
    PROPOSAL_START,
    SPLIT_REGEX,
    claimed_hand,
    claimed_value,
    format_message,
    format_proposal,
    format_split,
    ipd_regex,
    parse_ipd,
    parse_message,
    parse_proposal,
    parse_split,
)

FUZZ = settings(max_examples=10_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Control characters \x01..\x16 stand for format tokens, so drawn texts nest tags in tags often.
TOKENS = [
    "<A>",
    "<B>",
    MESSAGE_START,
    MESSAGE_END,
    PROPOSAL_START,
    PROPOSAL_END,
    "Proposal:",
    "hats",
    "books",
    "balls",
    "10",
    "rock",
    "scissors",
    "<<message_",
    "<Cooperate>",
    "<Defect>",
    "proposal :",
    "<<proposal_",
    "<<",
    ">>",
    " 5 ",
    "\u0130",
]
EXPAND = {chr(1 + i): token for i, token in enumerate(TOKENS)}
ODD = "\x00\x1b\x7f\t\n\r é🙂\u202e\ufeff\u3000\u0130\u017f\u212a\u0301\U0010ffff＜＞："  # unicode, controls
soup = st.text(st.characters(max_codepoint=0x7F, include_characters=ODD)).map(
    lambda t: "".join(EXPAND.get(c, c) for c in t)
)


def _pick(text: str, n: int, base: int = 11) -> list[int]:
    """n numbers in 0..base-1 derived from the text (deterministic, so examples replay)."""
    h = zlib.crc32(text.encode("utf-8", "surrogatepass")) + len(text)
    return [(h // base**i) % base for i in range(n)]


def _without(text: str, token: str) -> str:
    while token in text:
        text = text.replace(token, "")
    return text


def test_regexes_accept_every_canonical_output() -> None:
    for labels in IPD_LABELS.values():
        assert all(re.fullmatch(ipd_regex(labels), label) for label in labels)
    for units in itertools.product(range(11), repeat=3):
        assert re.fullmatch(SPLIT_REGEX, format_split(units))
        assert parse_split(format_split(units)) == (units, True)
    for coins in range(11):
        assert re.fullmatch(PROPOSAL_REGEX, format_proposal(coins))
        assert parse_proposal(format_proposal(coins)) == (coins, True)
    assert re.fullmatch(MESSAGE_REGEX, format_message("My hand is rock. " * 29))
    assert not re.fullmatch(MESSAGE_REGEX, format_message("x" * 501))


def check_ipd(text: str) -> None:
    ws = "".join(c for c in text if c.isspace())
    which = _pick(text, 1)[0] % 2
    for labels in IPD_LABELS.values():
        action, valid = parse_ipd(text, labels)
        assert valid == (text.strip() in labels)
        assert action == ("C" if text.strip() == labels[0] else "D")
        assert parse_ipd(ws + labels[which] + ws[::-1], labels) == ("CD"[which], True)
        assert not parse_ipd(text + labels[which], labels)[1] or not text.strip()


def check_split(text: str) -> None:
    units, valid = parse_split(text)
    assert len(units) == 3 and all(0 <= u <= 10 for u in units)
    assert valid or units == (0, 0, 0)
    x, y, z = _pick(text, 3)
    proposal = format_split((x, y, z))
    if len(text) % 2:
        proposal = proposal.upper()
    suffix = "\n" + text.replace(":", "")  # free text after the proposal, with no further `Proposal:`
    assert parse_split(text + proposal + suffix) == ((x, y, z), True)


def check_message(text: str) -> None:
    content, valid, truncated = parse_message(text)
    assert len(content) <= 500 and MESSAGE_START not in content and MESSAGE_END not in content
    assert truncated <= valid or not valid
    assert claimed_hand(text) in (None, "rock", "paper", "scissors")
    value = claimed_value(text)
    assert value is None or 1 <= value <= 20
    # the last well-formed message wins; its content is stripped and cut to 500 characters
    inner = _without(text, "<<message_")
    got = parse_message(text + format_message(inner) + inner)
    stripped = inner.strip()
    assert got == (stripped[:500].strip(), True, len(stripped) > 500)


def check_proposal(text: str) -> None:
    coins, valid = parse_proposal(text)
    assert 0 <= coins <= 10 and (valid or coins == 0)
    x, before, after = _pick(text, 3)
    suffix = _without(text, "<<proposal_start>>")
    assert parse_proposal(text + format_proposal(x) + suffix) == (x, True)
    spaced = f"{PROPOSAL_START}{' ' * (before % 3)}{x}{chr(10) * (after % 2)}{PROPOSAL_END}"
    assert parse_proposal(text + spaced + suffix) == (x, True)


@FUZZ
@given(soup)
@example("")
@example("\x01" * 10_000)
@example("x" * 10_000)
@example(MESSAGE_START)
@example(PROPOSAL_START * 1000)
@example("Proposal: 11 hats")
def test_parsers(text: str) -> None:
    """10,000 texts per parser: none raises, and valid outputs framed by the text parse as intended."""
    check_ipd(text)
    check_split(text)
    check_message(text)
    check_proposal(text)


def test_nested_and_odd_inputs() -> None:
    assert parse_proposal("<<proposal_start>> <<proposal_start>> 7 <<proposal_end>> <<proposal_end>>") == (7, True)
    assert parse_proposal("<<proposal_start>> 3 <<proposal_end>> then <<proposal_start>> 9 <<proposal_end>>") == (
        9,
        True,
    )
    assert parse_proposal("<<proposal_start>> 07 <<proposal_end>>") == (0, False)
    assert parse_proposal("<<proposal_start>> -1 <<proposal_end>>") == (0, False)
    assert parse_message("<<message_start>> a <<message_start>> b <<message_end>>") == ("b", True, False)
    assert parse_message("<<message_start>>hi<<message_end>> <<message_end>>") == ("hi", True, False)
    assert parse_message("hello <<message_start>>") == ("hello", False, False)
    assert parse_split("Proposal: 11 hats, 3 books") == ((0, 3, 0), True)
    assert parse_split("Proposal: nothing") == ((0, 0, 0), False)
    assert parse_split("Proposal: 1 hat, 2 book") == ((1, 2, 0), True)
    assert parse_split("I think Proposal: 1 hats. Final proposal: 4 BALLS") == ((0, 0, 4), True)
    assert parse_ipd("\u3000<A>\u3000") == ("C", True)  # unicode whitespace is whitespace
    assert claimed_hand("I have ROCK, not scissors") is None and claimed_hand("rock! Rock.") == "rock"
    assert claimed_value("my value is 7 of 10 coins") is None and claimed_value("7, out of 100") == 7


def test_huge_inputs_are_fast() -> None:
    huge = [
        "<" * 1_000_000,
        MESSAGE_START * 50_000,
        (PROPOSAL_START + " 1") * 50_000,
        "Proposal: " + "1 " * 500_000,
        "🙂\x00" * 500_000,
    ]
    start = time.perf_counter()
    for text in huge:
        parse_ipd(text)
        parse_split(text)
        parse_message(text)
        parse_proposal(text)
        claimed_hand(text)
        claimed_value(text)
    assert time.perf_counter() - start < 5.0
