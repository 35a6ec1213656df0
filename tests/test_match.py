"""The match runner: exact env rewards with scripted seats, token-in-token-out chats, the guided
fallback and its counts (a token test double, and the real vLLM engine on the tiny model)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from support import GUIDED, FakeEngine

import envs
from actors.chat import ChatTemplate
from actors.engine import UnknownAdapterError
from actors.match import SeatSpec, play_match
from actors.scripted_engine import ScriptedEngine
from actors.trajectories import SeatTrajectory, to_batch


@pytest.fixture(scope="module")
def template(model_dir: Path) -> ChatTemplate:
    return ChatTemplate.from_pretrained(str(model_dir))


def scripted(name: str) -> SeatSpec:
    return SeatSpec(ScriptedEngine(name), name)


def play(env_name: str, seats: tuple[SeatSpec, SeatSpec], seed: int = 0, template=None, **options) -> tuple:
    return asyncio.run(play_match(envs.make(env_name, **options), seats, seed, template=template, game_id=7))


def test_scripted_seats_get_the_envs_exact_rewards() -> None:
    tft, ad = play("ipd", (scripted("tit_for_tat"), scripted("always_defect")))
    assert tft.actions == ["C"] + ["D"] * 9 and ad.actions == ["D"] * 10
    assert tft.rewards == [0.0] + [1.0] * 9 and ad.rewards == [5.0] + [1.0] * 9
    assert (tft.policy_name, tft.opponent_name, tft.seat, ad.seat) == ("tit_for_tat", "always_defect", 0, 1)
    assert tft.token_ids == [] and tft.n_decisions == 10 and tft.n_invalid == 0 and tft.guided == []
    assert json.loads(tft.info_json)["rewards"] == [tft.rewards, ad.rewards]
    to_batch([tft, ad])


@pytest.mark.parametrize("game", ["split_nocomm", "trust_and_split"])
def test_scripted_rewards_per_round_match_the_env(game: str) -> None:
    a, b = play(game, (scripted("random"), scripted(envs.scripted.NAMES[game][0])), seed=3)
    info = json.loads(a.info_json)
    assert [a.rewards, b.rewards] == info["rewards"] and [a.actions, b.actions] == info["actions"]
    assert len(a.rewards) == info["n_rounds"] == 10
    assert [a.n_decisions, b.n_decisions] == info["n_decisions"]


def _check_token_trajectory(traj: SeatTrajectory, template: ChatTemplate) -> None:
    n = len(traj.token_ids)
    assert len(traj.logprobs) == len(traj.token_round) == len(traj.token_version) == n
    gen = [i for i, r in enumerate(traj.token_round) if r >= 0]
    assert all(traj.logprobs[i] == -0.25 and traj.token_version[i] == traj.policy_version for i in gen)
    assert all(traj.logprobs[i] == 0.0 and traj.token_version[i] == -1 for i in range(n) if i not in set(gen))


def test_llm_seat_guided_fallback_counts_and_chat(template: ChatTemplate) -> None:
    fake = FakeEngine(template)
    fake.loaded.add("learner@v3")
    llm = SeatSpec(fake, "learner", version=3, adapter="learner@v3", trainable=True, free_samples=1)
    a, b = play("ipd", (llm, scripted("tit_for_tat")), template=template)
    # every free sample is garbage: each decision resampled once, guided, valid
    assert (a.n_decisions, a.n_resampled, a.n_invalid) == (10, 10, 0)
    assert a.guided == [True] * 10 and a.decision_regex == ["(<A>|<B>)"] * 10 and len(fake.calls) == 20
    assert [c[1].regex for c in fake.calls[:2]] == [None, "(<A>|<B>)"] and fake.calls[0][2] == "learner@v3"
    assert fake.calls[0][1].max_tokens == 16  # the env's hint
    # only accepted samples are kept: the chat is exactly the whole-chat render of the accepted turns
    chat = template.new_chat()
    for user, answer in _turns(a, b):
        chat.add_user(user)
        chat.add_assistant(template.encode(answer) + [template.tokenizer.eos_token_id])
    assert a.token_ids == chat.ids == template.render_ids(chat.messages, add_generation_prompt=False)
    assert "Sure!" not in template.decode(a.token_ids)
    _check_token_trajectory(a, template)
    assert sorted(set(a.token_round) - {-1}) == list(range(10))
    info = json.loads(a.info_json)
    assert [a.rewards, b.rewards] == info["rewards"] and info["n_invalid"] == [0, 0]
    batch = to_batch([a, b])
    assert batch.num_rows == 2


def _turns(a: SeatTrajectory, b: SeatTrajectory) -> list[tuple[str, str]]:
    """The user turns and accepted answers of alice's chat in an IPD game, rebuilt from the env."""
    env = envs.make("ipd")
    obs, infos = env.reset(seed=0)
    out = []
    label = {"C": "<A>", "D": "<B>"}
    for t in range(10):
        out.append((obs["alice"], label[a.actions[t]]))
        obs, *_ = env.step({"alice": label[a.actions[t]], "bob": label[b.actions[t]]})
    return out


def test_free_sample_accepted_when_valid_and_invalid_counted(template: ChatTemplate) -> None:
    fake = FakeEngine(template, garbage="<B>")
    free = SeatSpec(fake, "base", free_samples=1)
    a, _ = play("ipd", (free, scripted("always_cooperate")), template=template, n_rounds=3)
    assert (a.n_resampled, a.n_invalid, a.guided) == (0, 0, [False] * 3) and a.actions == ["D"] * 3
    assert a.decision_regex == [""] * 3
    assert all(c[1].regex is None and c[2] is None for c in fake.calls)

    # a guided answer the env still rejects is passed on anyway and counted invalid
    GUIDED["(<A>|<B>)"] = ("nope", "nope")
    try:
        a, _ = play("ipd", (SeatSpec(FakeEngine(template), "base"), scripted("always_cooperate")), template=template)
    finally:
        GUIDED["(<A>|<B>)"] = ("<A>", "<B>")
    assert (a.n_decisions, a.n_resampled, a.n_invalid) == (10, 0, 10) and a.actions == ["D"] * 10
    assert json.loads(a.info_json)["n_invalid"][0] == 10


def test_unknown_adapter_is_an_error(template: ChatTemplate) -> None:
    seat = SeatSpec(FakeEngine(template), "learner", version=1, adapter="learner@v1")
    with pytest.raises(UnknownAdapterError):
        play("ipd", (seat, scripted("always_cooperate")), template=template)


def test_trust_and_split_message_and_proposal_share_the_round(template: ChatTemplate) -> None:
    fake = FakeEngine(template)
    a, b = play(
        "trust_and_split", (SeatSpec(fake, "base"), SeatSpec(fake, "base", free_samples=1)), seed=5, template=template
    )
    info = json.loads(a.info_json)
    assert [a.rewards, b.rewards] == info["rewards"] and a.n_decisions == b.n_decisions == 20
    assert b.n_resampled == 20 and a.n_resampled == 0 and a.guided == [True] * 20
    for traj in (a, b):
        _check_token_trajectory(traj, template)
        rounds = [r for r in traj.token_round if r >= 0]
        assert rounds == sorted(rounds) and set(rounds) == set(range(10))
        assert template.decode(traj.token_ids).count("<<message_start>>My hand") == 10
    to_batch([a, b])


# -- the real engine on the tiny random model ------------------------------------------------
@pytest.fixture(scope="module")
def loop():
    """One event loop for the module: an AsyncLLM is bound to the loop it runs in."""
    loop = asyncio.new_event_loop()
    yield loop
    pending = asyncio.all_tasks(loop)
    for task in pending:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    loop.close()


@pytest.fixture(scope="module")
def vllm_engine(tiny_model_dir: Path, loop: asyncio.AbstractEventLoop):
    from actors.vllm_engine import VLLMEngine

    engine = VLLMEngine(model=str(tiny_model_dir), max_loras=2, max_lora_rank=8, max_model_len=2048)
    loop.run_until_complete(engine.start())
    yield engine
    engine.shutdown()


@pytest.mark.slow
def test_guided_fallback_turns_garbage_into_valid_actions_on_vllm(vllm_engine, tiny_model_dir: Path, loop) -> None:
    template = ChatTemplate.from_pretrained(str(tiny_model_dir))
    seat = SeatSpec(vllm_engine, "base", free_samples=1, max_tokens=8)
    env = envs.make("ipd", n_rounds=4)
    a, b = loop.run_until_complete(play_match(env, (seat, scripted("tit_for_tat")), 0, template=template))
    # the random tiny model never writes a valid action unguided: every decision falls back
    assert (a.n_decisions, a.n_resampled, a.n_invalid) == (4, 4, 0) and a.guided == [True] * 4
    assert set(a.actions) <= {"C", "D"} and json.loads(a.info_json)["n_invalid"] == [0, 0]
    gen = [i for i, r in enumerate(a.token_round) if r >= 0]
    assert gen and all(a.logprobs[i] <= 0.0 for i in gen)
    text = template.decode([a.token_ids[i] for i in gen])
    assert text.replace("<|im_end|>", "").replace("<A>", "").replace("<B>", "") == ""
    to_batch([a, b])
