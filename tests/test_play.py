"""`reciprocity play`: every scripted pairing of IPD, a sample of the others, JSON shape, errors."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from envs import scripted
from reciprocity.cli import app

runner = CliRunner()
KEYS = {
    "agents",
    "return_per_game",
    "return_per_round",
    "cooperation_rate",
    "p_coop_given_opp_coop",
    "p_coop_given_opp_defect",
    "efficiency",
    "welfare_per_round",
    "invalid_rate",
}


def _play(*args: str) -> dict:
    result = runner.invoke(app, ["play", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.parametrize("pair", list(itertools.combinations_with_replacement(scripted.NAMES["ipd"], 2)))
def test_every_ipd_pairing(pair: tuple[str, str]) -> None:
    out = _play("--env", "ipd", "--agents", *pair, "--games", "8", "--seed", "3")
    assert (out["game"], out["games"], out["seed"]) == ("ipd", 8, 3)
    assert [p["agents"] for p in out["pairs"]] == [list(pair), list(pair[::-1])]
    for p in out["pairs"]:
        assert set(p) >= KEYS and p["efficiency"] is None
        assert all(len(p[k]) == 2 for k in KEYS - {"agents", "efficiency", "welfare_per_round"})
        assert p["invalid_rate"] == [0.0, 0.0]
    if "random" not in pair:  # deterministic strategies: the swapped order mirrors the first
        first, second = out["pairs"]
        assert first["return_per_game"] == second["return_per_game"][::-1]


def test_tit_for_tat_against_always_defect() -> None:
    out = _play("--env", "ipd", "--agents", "tit_for_tat", "always_defect", "--games", "16")
    first, second = out["pairs"]
    assert first["return_per_game"] == [9.0, 14.0] and second["return_per_game"] == [14.0, 9.0]
    assert first["return_per_round"] == [0.9, 1.4]
    assert first["cooperation_rate"] == [0.1, 0.0]
    assert first["p_coop_given_opp_defect"] == [0.0, 0.0]
    assert first["p_coop_given_opp_coop"] == [None, 0.0]  # always_defect never cooperates
    assert first["welfare_per_round"] == pytest.approx(2.3)


@pytest.mark.parametrize(
    ("game", "pair", "options"),
    [
        ("split_nocomm", ("greedy", "welfare_maximising"), []),
        ("split_nocomm", ("random", "random"), ["-o", "n_rounds=4"]),
        ("trust_and_split", ("always_claim_10", "truthful"), []),
        ("trust_and_split", ("liar", "random"), ["-o", "values=uniform", "-o", "horizon=geometric"]),
        ("ipd", ("grim_trigger", "random_0.2"), ["-o", "wording=overt"]),
    ],
)
def test_sample_of_other_pairings(game: str, pair: tuple[str, str], options: list[str]) -> None:
    out = _play("--env", game, "--agents", *pair, "--games", "8", *options)
    for p in out["pairs"]:
        assert set(p) >= KEYS
        if game != "ipd":
            assert 0 < p["efficiency"] <= 1 and p["cooperation_rate"] == [None, None]
    if options:
        assert out["options"]


def test_welfare_maximisers_are_efficient() -> None:
    out = _play("--env", "split_nocomm", "--agents", "welfare_maximising", "welfare_maximising", "--games", "8")
    assert out["pairs"][0]["efficiency"] == pytest.approx(1.0)


def test_table_output() -> None:
    result = runner.invoke(app, ["play", "--env", "trust_and_split", "--agents", "truthful", "liar", "--games", "4"])
    assert result.exit_code == 0 and "welfare/round" in result.stdout and "liar" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--env", "ipd", "--agents", "tit_for_tat", "nice"], "valid: always_cooperate"),
        (["--env", "chess", "--agents", "a", "b"], "valid games: ipd, split_nocomm, trust_and_split"),
        (["--env", "split_nocomm", "--agents", "greedy", "tit_for_tat"], "valid: greedy"),
        (["--env", "ipd", "--agents", "tit_for_tat", "tit_for_tat", "-o", "colour=red"], "valid options"),
        (["--env", "ipd", "--agents", "tit_for_tat", "tit_for_tat", "-o", "colour"], "KEY=VALUE"),
        (["--env", "ipd", "--agents", "tit_for_tat", "self"], "agent 'self' is the adapter a training run trains"),
        (["--env", "ipd", "--agents", "human", "tit_for_tat"], "agent 'human' takes a seat in the web app"),
    ],
)
def test_errors_exit_2_with_one_line(args: list[str], message: str) -> None:
    result = runner.invoke(app, ["play", *args, "--json"])
    assert result.exit_code == 2
    assert message in result.stderr and result.stderr.count("\n") == 1 and result.stdout == ""


def test_play_pulls_in_no_heavy_stack() -> None:
    """envs is pure Python: `reciprocity play` of two strategies (agent specs parsed by
    reciprocity.agents) imports neither torch, ray nor vllm."""
    code = (
        "import sys, reciprocity.cli, reciprocity.play, envs.scripted, envs.metrics, envs.loop\n"
        "result = reciprocity.play.run('ipd', ('tit_for_tat', 'nice=scripted:always_defect'), 2, 0, {})\n"
        "assert result['pairs'][0]['agents'] == ['tit_for_tat', 'nice=scripted:always_defect'], result\n"
        "bad = {'torch', 'ray', 'vllm'} & set(sys.modules)\n"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
