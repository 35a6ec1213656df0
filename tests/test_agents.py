"""Agent specs: every accepted form, one-line errors naming the forms, no API key in reprs or errors,
and `run:ID[@V]` resolved against a local MLflow store with logged adapter snapshots."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from reciprocity.agents import FORMS, AgentSpecError, parse_agent, refuse_human, spec_kind

SECRET = "sk-test-abcdefghijklmnop1234"


def write_adapter(path: Path, payload: bytes, r: int = 8) -> Path:
    """An adapter directory as PEFT saves it (the bytes need not be real weights to be parsed)."""
    path.mkdir(parents=True)
    (path / "adapter_model.safetensors").write_bytes(payload)
    (path / "adapter_config.json").write_text(json.dumps({"r": r, "peft_type": "LORA"}))
    return path


def test_scripted_forms() -> None:
    for spec in ("scripted:tit_for_tat", "tit_for_tat"):
        agent = parse_agent(spec, "ipd")
        assert (agent.kind, agent.name, agent.spec) == ("scripted", "tit_for_tat", spec)
        assert (agent.player.kind, agent.player.policy) == ("scripted", "tit_for_tat")
        assert agent.adapter is None and agent.api is None and not agent.needs_engine
    assert parse_agent("random_0.3", "ipd").player.policy == "random_0.3"
    assert parse_agent("scripted:greedy", "split_nocomm").player.policy == "greedy"
    with pytest.raises(AgentSpecError, match="valid: greedy") as e:
        parse_agent("scripted:tit_for_tat", "split_nocomm")
    assert all(form in str(e.value) for form in FORMS) and "\n" not in str(e.value)


def test_base_and_human() -> None:
    base = parse_agent("base", "ipd")
    assert base.kind == "base" and base.needs_engine
    assert (base.player.kind, base.player.adapter, base.player.version) == ("llm", None, -1)
    human = parse_agent("human", "ipd")
    assert human.kind == "human" and human.player is None
    with pytest.raises(AgentSpecError, match="reciprocity serve"):
        refuse_human([base, human], "evaluate")
    refuse_human([base], "evaluate")  # no human: nothing to refuse


def test_self_is_the_trained_adapter_only_in_training() -> None:
    me = parse_agent("self", "ipd")
    assert (me.kind, me.name, me.player, me.needs_engine) == ("self", "self", None, False)
    assert parse_agent("mine=self").name == "mine"
    with pytest.raises(AgentSpecError, match="agent 'self' is the adapter a training run trains"):
        refuse_human([parse_agent("base"), me], "play")


@pytest.mark.parametrize(("spec", "kind"), [
    ("tit_for_tat", "scripted"), ("scripted:greedy", "scripted"), ("x=scripted:greedy", "scripted"),
    ("base", "base"), ("self", "self"), ("human", "human"), ("adapter:/no/such/dir", "adapter"),
    ("run:abc@3", "run"), ("api:http://h/v1#m", "api"), ("foo:bar", "foo"),
])
def test_spec_kind_reads_the_form_without_resolving(spec: str, kind: str) -> None:
    assert spec_kind(spec) == kind  # no file, MLflow store or strategy table is consulted


def test_adapter_dir(tmp_path: Path) -> None:
    a = parse_agent(f"adapter:{write_adapter(tmp_path / 'x' / 'policy', b'weights-a')}", "ipd")
    b = parse_agent(f"adapter:{write_adapter(tmp_path / 'y' / 'policy', b'weights-b')}", "ipd")
    assert a.kind == "adapter" and a.name == "policy" and a.needs_engine
    assert a.adapter.sha256 == hashlib.sha256(b"weights-a").hexdigest() and a.adapter.config["r"] == 8
    a.adapter.check_sha()
    # the player is bound to exactly the key of the version to load; same directory name, other bytes: other key
    assert a.player.adapter == a.adapter.key and (a.player.policy, a.player.version) == (a.adapter.name, 0)
    assert a.adapter.key != b.adapter.key and not a.player.trainable
    with pytest.raises(AgentSpecError, match="cannot read adapter"):
        parse_agent(f"adapter:{tmp_path / 'missing'}")


def test_api_spec_reads_the_key_name_never_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RECIPROCITY_API_KEY", "OPENAI_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    spec = "api:https://api.example.com/v1#gpt-4o-mini"
    assert parse_agent(spec).api.api_key_env is None  # no key set: a local endpoint without auth
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    agent = parse_agent(spec, "ipd")
    assert agent.api.api_key_env == "OPENAI_API_KEY"
    monkeypatch.setenv("RECIPROCITY_API_KEY", SECRET + "x")
    agent = parse_agent(spec, "ipd")
    assert agent.kind == "api" and agent.name == "gpt-4o-mini" and not agent.needs_engine
    assert (agent.api.base_url, agent.api.model, agent.api.api_key_env) == (
        "https://api.example.com/v1", "gpt-4o-mini", "RECIPROCITY_API_KEY")
    assert agent.api.on_failure == "raise"  # an evaluation never scores a dead endpoint as bad play
    assert (agent.player.kind, agent.player.policy) == ("api", "gpt-4o-mini")
    assert SECRET not in repr(agent) and SECRET not in repr(agent.api) and SECRET not in str(agent)
    for bad in ("api:https://api.example.com/v1", "api:not-a-url#m", f"api:https://u:{SECRET}@example.com/v1#m"):
        with pytest.raises(AgentSpecError) as e:
            parse_agent(bad)
        assert SECRET not in str(e.value) and "\n" not in str(e.value)


def test_labelled_specs_keep_the_inner_agent_under_the_label(tmp_path: Path) -> None:
    tft = parse_agent("nice=scripted:tit_for_tat", "ipd")
    assert (tft.kind, tft.name, tft.spec, tft.player.policy) == ("scripted", "nice", "nice=scripted:tit_for_tat",
                                                                "tit_for_tat")
    assert parse_agent("ref.model-1=base", "ipd").name == "ref.model-1"
    a = parse_agent(f"mine=adapter:{write_adapter(tmp_path / 'policy', b'w')}", "ipd")
    assert a.kind == "adapter" and a.name == "mine" and a.adapter.sha256 == hashlib.sha256(b"w").hexdigest()
    # an '=' after a kind prefix is part of that spec (a URL query, a path), not a label
    assert parse_agent("api:http://127.0.0.1:1/v1?x=1#m", "ipd").kind == "api"
    for bad in ("x=nothing_known", "1x=base", "=base", "x="):
        with pytest.raises(AgentSpecError):
            parse_agent(bad, "ipd")


@pytest.mark.parametrize("spec", ["foo:bar", "adapter:", "run:", "base:x", "what ever", "scripted:"])
def test_unknown_specs_list_the_accepted_forms(spec: str) -> None:
    with pytest.raises(AgentSpecError) as e:
        parse_agent(spec, "ipd")
    assert isinstance(e.value, ValueError) and "\n" not in str(e.value)
    assert "accepted forms: " + ", ".join(FORMS) in str(e.value)


# -- run:RUN_ID[@VERSION] against a local MLflow store ---------------------------------------------
@pytest.fixture()
def mlflow_run(tmp_path: Path) -> tuple[str, str, dict[int, bytes]]:
    """A run that logged adapter snapshots v1 (files nested one level, as AdapterVersion.write lays
    them out) and v3 (files directly under adapters/v3, as the training driver logs them)."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("t", artifact_location=str(tmp_path / "artifacts"))
    run_id = client.create_run(exp).info.run_id
    payloads = {1: b"snapshot-one", 3: b"snapshot-three"}
    write_adapter(tmp_path / "v1" / "learner-v1-abc", payloads[1])
    client.log_artifacts(run_id, str(tmp_path / "v1"), "adapters/v1")
    write_adapter(tmp_path / "v3", payloads[3], r=16)
    client.log_artifacts(run_id, str(tmp_path / "v3"), "adapters/v3")
    client.log_text(run_id, "not an adapter", "adapters/notes.txt")
    client.set_terminated(run_id)
    return uri, run_id, payloads


def test_run_spec_resolves_latest_and_pinned_versions(mlflow_run: tuple[str, str, dict[int, bytes]]) -> None:
    uri, run_id, payloads = mlflow_run
    latest = parse_agent(f"run:{run_id}", "ipd", tracking_uri=uri)
    assert latest.kind == "run" and latest.adapter.version == 3 and latest.adapter.config["r"] == 16
    assert latest.adapter.sha256 == hashlib.sha256(payloads[3]).hexdigest()
    assert latest.player.adapter == latest.adapter.key == f"run-{run_id[:8]}@v3"
    assert latest.name == f"{run_id[:8]}@v3"
    pinned = parse_agent(f"run:{run_id}@1", "ipd", tracking_uri=uri)
    assert pinned.adapter.version == 1 and pinned.adapter.data == payloads[1]


def test_labelled_run_spec_is_resolved_in_the_configs_store(mlflow_run: tuple[str, str, dict[int, bytes]],
                                                             monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """evaluate's `resolve` must look a labelled `aa=run:ID` up in the config's MLflow store, like a bare
    `run:ID` (it once passed no store for labelled specs and MLflow created ./mlflow.db instead)."""
    from reciprocity.config import Config
    from reciprocity.evaluate import resolve

    uri, run_id, payloads = mlflow_run
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = Config.model_validate({"tracking": {"uri": uri}})
    agents = resolve("ipd", [f"aa=run:{run_id}", f"one=run:{run_id}@1"], cfg)  # labelled specs only
    assert [a.name for a in agents] == ["aa", "one"] and agents[1].adapter.version == 1
    assert agents[0].adapter.sha256 == hashlib.sha256(payloads[3]).hexdigest()
    assert not (cwd / "mlflow.db").exists() and not (cwd / "mlruns").exists()


def test_run_spec_errors(mlflow_run: tuple[str, str, dict[int, bytes]], tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    uri, run_id, _ = mlflow_run
    empty = MlflowClient(uri).create_run(MlflowClient(uri).get_run(run_id).info.experiment_id).info.run_id
    cases = [
        (f"run:{run_id}@7", "cannot resolve"),
        (f"run:{'0' * 32}", "cannot resolve"),
        (f"run:{empty}", "no adapter snapshots"),
        (f"run:{run_id}@latest", "run:RUN_ID@VERSION"),
    ]
    for spec, message in cases:
        with pytest.raises(AgentSpecError, match=message) as e:
            parse_agent(spec, "ipd", tracking_uri=uri)
        assert "\n" not in str(e.value)
