"""The two fidelity options of issue 16 (the authors' choices as options) and the game options the
CPU configs need: `rollout.free_sample_match`, `learner.guided_logprob`, Trust-and-Split's
`message_chars`, the `fairness` figure and `rollout.baseline: none`."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import numpy as np
import pytest
from support import FakeEngine, ipd_table

import envs
from actors.chat import ChatTemplate
from actors.match import SeatSpec, free_sample_ok, play_match
from actors.scripted_engine import ScriptedEngine
from envs.metrics import GameRecord, summarize
from envs.parsing import MESSAGE_REGEX

CHATTY = "Sure! Proposal: 3 hats, 2 books, 1 balls. Hope that is fair."


@pytest.fixture(scope="module")
def template(model_dir: Path) -> ChatTemplate:
    return ChatTemplate.from_pretrained(str(model_dir))


def _split_game(template: ChatTemplate, garbage: str, match: str):
    seat = SeatSpec(FakeEngine(template, garbage=garbage), "base", free_samples=1, free_sample_match=match)
    scripted = SeatSpec(ScriptedEngine("greedy"), "greedy")
    env = envs.make("split_nocomm", n_rounds=3)
    return asyncio.run(play_match(env, (seat, scripted), 5, template=template))[0]


def test_lenient_accepts_an_action_inside_chatter_full_does_not(template: ChatTemplate) -> None:
    lenient = _split_game(template, CHATTY, "lenient")
    assert lenient.guided == [False] * 3 and lenient.n_resampled == 0
    assert lenient.actions == ["3,2,1"] * 3
    full = _split_game(template, CHATTY, "full")
    assert full.guided == [True] * 3 and full.n_resampled == 3  # every free sample rejected, then guided
    assert full.actions != ["3,2,1"] * 3


def test_full_accepts_a_whole_answer_with_surrounding_whitespace(template: ChatTemplate) -> None:
    full = _split_game(template, "  Proposal: 3 hats, 2 books, 1 balls\n", "full")
    assert full.guided == [False] * 3 and full.actions == ["3,2,1"] * 3


def test_free_sample_ok_on_trust_and_split_messages() -> None:
    env = envs.make("trust_and_split")
    _, infos = env.reset(seed=3)
    starter = next(a for a in ("alice", "bob") if infos[a]["acts"])
    regex = infos[starter]["regex"]
    wrapped = "I think <<message_start>>My hand is rock.<<message_end>> ok"
    assert free_sample_ok(env, starter, wrapped, regex, "lenient")
    assert not free_sample_ok(env, starter, wrapped, regex, "full")
    assert free_sample_ok(env, starter, "<<message_start>>My hand is rock.<<message_end>>", regex, "full")
    assert not free_sample_ok(env, starter, "no tags at all", regex, "lenient")


def test_free_sample_match_is_checked() -> None:
    with pytest.raises(ValueError, match="free_sample_match"):
        SeatSpec(object(), "base", free_sample_match="strict")  # type: ignore[arg-type]


def test_guided_logprob_full_builds_no_masks_constrained_needs_them(tokenizer) -> None:
    from learner.batch import BatchError, CreditSpec, build_iteration
    from learner.constrain import UNCONSTRAINED, Constrainer

    table = ipd_table(tokenizer, n_games=4, guided=True)
    spec = CreditSpec("aa", 0.9, 5.0, 0.5, 0.9)
    constrainer = Constrainer(tokenizer, len(tokenizer))
    constrained = build_iteration(table, spec, constrainer=constrainer)
    assert any((mb.constraint != UNCONSTRAINED).any() for mb in constrained.micro_batches)
    full = build_iteration(table, spec, constrainer=constrainer, guided_logprob="full")
    assert all((mb.constraint == UNCONSTRAINED).all() and mb.bitmasks.shape[0] == 0 for mb in full.micro_batches)
    assert full.n_tok == constrained.n_tok and full.n_guided_tokens == constrained.n_guided_tokens
    for a, b in zip(full.micro_batches, constrained.micro_batches, strict=True):  # same tokens, same credits
        assert (a.target_ids == b.target_ids).all() and (a.credit == b.credit).all()
    assert build_iteration(table, spec, guided_logprob="full").n_tok == full.n_tok  # no constrainer needed
    with pytest.raises(BatchError, match="Constrainer"):
        build_iteration(table, spec, guided_logprob="constrained")
    with pytest.raises(BatchError, match="guided_logprob"):
        build_iteration(table, spec, constrainer=constrainer, guided_logprob="partial")


def test_config_options_and_their_errors() -> None:
    from reciprocity.config import ConfigError, load_config

    cfg = load_config(None, ["learner.guided_logprob=full", "rollout.free_sample_match=full", "rollout.baseline=none"])
    assert (cfg.learner.guided_logprob, cfg.rollout.free_sample_match, cfg.rollout.baseline) == ("full", "full", "none")
    default = load_config(None)  # today's behaviour stays the default
    assert (default.learner.guided_logprob, default.rollout.free_sample_match) == ("constrained", "lenient")
    for bad in ("learner.guided_logprob=partial", "rollout.free_sample_match=strict", "rollout.baseline=group"):
        with pytest.raises(ConfigError, match=re.escape(bad.split("=")[0])):
            load_config(None, [bad])


def test_paper_configs_take_the_authors_choices() -> None:
    from reciprocity.config import load_config

    root = Path(__file__).resolve().parents[1] / "configs"
    iterations = {"ipd_aa": 3000, "ipd_naive": 1000, "split_nocomm_naive": 3000, "split_nocomm_aa": 3000,
                  "split_nocomm_sum": 3000, "trust_and_split_naive": 3000, "trust_and_split_aa": 3000,
                  "trust_and_split_sum": 3000, "ipd_aa_no_buffer": 3000, "ipd_aa_no_baseline": 3000}
    for name, n in iterations.items():
        cfg = load_config(root / f"{name}.yaml")
        assert cfg.iterations == n, name
        assert cfg.model.max_model_len == 10_000, name
        assert (cfg.learner.guided_logprob, cfg.rollout.free_sample_match) == ("full", "full"), name
    assert not load_config(root / "ipd_aa_no_buffer.yaml").buffer.enabled
    assert load_config(root / "ipd_aa_no_baseline.yaml").rollout.baseline == "none"
    for game in ("split_nocomm", "trust_and_split"):
        assert load_config(root / f"{game}_sum.yaml").method.name == "sum"
    exploit = load_config(root / "exploit_split_nocomm_cpu.yaml")
    assert exploit.method.reward_normaliser == 100
    assert (exploit.rollout.seed_group_size, exploit.rollout.baseline) == (8, "seed_group")


# -- Trust-and-Split's message cap ---------------------------------------------------------------
def test_message_chars_changes_rules_regex_budget_and_truncation() -> None:
    default = envs.make("trust_and_split")
    obs, infos = default.reset(seed=1)
    starter = next(a for a in ("alice", "bob") if infos[a]["acts"])
    assert infos[starter]["regex"] == MESSAGE_REGEX and infos[starter]["max_tokens"] == 256
    assert "at most 500 characters" in obs[starter]

    env = envs.make("trust_and_split", message_chars=100)
    obs, infos = env.reset(seed=1)
    assert "at most 100 characters" in obs[starter] and "500" not in obs[starter]
    regex = infos[starter]["regex"]
    assert re.fullmatch(regex, "<<message_start>>" + "x" * 100 + "<<message_end>>")
    assert not re.fullmatch(regex, "<<message_start>>" + "x" * 101 + "<<message_end>>")
    assert infos[starter]["max_tokens"] == 24 + 232 * 100 // 500
    env.step({starter: "<<message_start>>" + "y" * 150 + "<<message_end>>"})
    info = env.game_info()
    assert info["options"]["message_chars"] == 100
    assert env._messages[("alice", "bob").index(starter)] == "y" * 100  # cut to the cap, counted
    assert sum(env._truncated) == 1


@pytest.mark.parametrize("bad", [0, -3, True, "many", 2.5])
def test_message_chars_rejects_bad_values(bad) -> None:
    with pytest.raises(envs.EnvConfigError, match="message_chars"):
        envs.make("trust_and_split", message_chars=bad)


def test_message_chars_is_not_an_option_of_other_games() -> None:
    with pytest.raises(envs.EnvConfigError, match="unknown option 'message_chars'"):
        envs.make("split_nocomm", message_chars=100)


# -- fairness ------------------------------------------------------------------------------------
def _record(game: str, a: list[float], b: list[float]) -> GameRecord:
    info = {"max_welfare": [200.0] * len(a), "messages": [], "claims": []}
    return GameRecord(game, [["x"] * len(a), ["x"] * len(b)], [a, b], info, [0, 0], [len(a), len(b)])


def test_fairness_is_one_for_equal_scores_zero_for_take_all_and_absent_in_ipd() -> None:
    equal = _record("split_nocomm", [10.0, 20.0], [20.0, 10.0])
    take_all = _record("split_nocomm", [100.0, 50.0], [0.0, 0.0])
    lopsided = _record("split_nocomm", [30.0], [10.0])  # 1 - 20/40
    nothing = _record("split_nocomm", [0.0], [0.0])
    assert summarize("split_nocomm", [equal])["fairness"] == 1.0
    assert summarize("split_nocomm", [take_all])["fairness"] == 0.0
    assert summarize("split_nocomm", [lopsided])["fairness"] == 0.5
    assert summarize("split_nocomm", [nothing])["fairness"] == 1.0
    assert np.isclose(summarize("split_nocomm", [equal, take_all, lopsided])["fairness"], 0.5)
    ipd = GameRecord("ipd", [["C"], ["C"]], [[3.0], [3.0]], {}, [0, 0], [1, 1])
    assert "fairness" not in summarize("ipd", [ipd])
    assert summarize("trust_and_split", [])["fairness"] is None
