"""The typed config: every shipped config loads; malformed input names the key; overrides apply."""

from __future__ import annotations

from pathlib import Path

import pytest

from reciprocity import checkpoint
from reciprocity.config import Config, ConfigError, apply_override, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.rollout.games_per_iteration % cfg.rollout.seed_group_size == 0


def test_spec_table_is_mirrored() -> None:
    """The 7B configs carry the spec's section-4 table."""
    root = CONFIGS[0].parent
    aa = load_config(root / "ipd_aa.yaml")
    assert (aa.method.beta, aa.method.gamma, aa.method.entropy_coef, aa.buffer.enabled) == (0.5, 0.9, 0.01, True)
    assert aa.rollout.games_per_iteration == 128 and aa.learner.lr == 3e-6
    split = load_config(root / "split_nocomm_aa.yaml")
    assert (split.method.beta, split.method.kl_coef, split.rollout.seed_group_size) == (1.0, 0.001, 8)
    tas = load_config(root / "trust_and_split_naive.yaml")
    assert (tas.method.discount, tas.buffer.enabled, tas.method.reward_normaliser) == (0.96, False, 100.0)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("method.beta=abc", "method.beta"),
        ("methd.beta=1", "methd"),
        ("method.name=greedy", "method.name"),
        ("rollout.games_per_iteration=1", "rollout.games_per_iteration"),
        ("lora.r=7", "lora.r"),
        ("buffer.p_snapshot=1.5", "buffer.p_snapshot"),
    ],
)
def test_bad_override_names_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    msg = str(e.value)
    assert key in msg and "\n" not in msg


def test_override_sets_nested_value() -> None:
    cfg = load_config(None, ["method.beta=2.5", "game.options={n_rounds: 3}", "rollout.workers=3"])
    assert cfg.method.beta == 2.5 and cfg.game.options == {"n_rounds": 3} and cfg.rollout.workers == 3


def test_override_without_equals_is_refused() -> None:
    data: dict = {}
    with pytest.raises(ConfigError, match="key.sub=value"):
        apply_override(data, "method.beta")


def test_malformed_yaml_names_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("method:\n  beta: [1,\n")
    with pytest.raises(ConfigError, match="malformed YAML"):
        load_config(bad)


def test_missing_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "nope.yaml")


def test_groups_must_divide_games() -> None:
    with pytest.raises(ConfigError, match="seed_group_size"):
        load_config(None, ["rollout.games_per_iteration=10", "rollout.seed_group_size=4"])


def test_fingerprint_ignores_bookkeeping_only() -> None:
    a = Config()
    assert a.fingerprint() == Config(iterations=99, checkpoint={"every": 7}).fingerprint()
    assert a.fingerprint() != Config(method={"beta": 0.7}).fingerprint()
    # the thread count is speed only: a checkpoint made before learner.threads existed still resumes
    assert a.fingerprint() == Config(learner={"threads": 1}).fingerprint()
    # so is activation checkpointing (memory and speed; the same gradients)
    assert a.fingerprint() == Config(learner={"gradient_checkpointing": False}).fingerprint()
    assert a.fingerprint() == Config(rollout={"engine_threads": 1}).fingerprint()  # speed only
    assert a.fingerprint() == Config(rollout={"block_size": 128}).fingerprint()  # speed only
    assert a.fingerprint() == Config(rollout={"probe_tolerance": 0.5}).fingerprint()  # a check, not a setting
    assert a.fingerprint() != Config(learner={"lr": 0.5}).fingerprint()
    assert a.fingerprint() == Config(runs_dir="/elsewhere/runs").fingerprint()  # where, not what


def test_engine_threads_take_the_node_in_sync_mode_and_the_ray_cpus_in_async_mode() -> None:
    from reciprocity.evaluate import engine_options

    def threads(mode: str, **rollout: object) -> object:
        return engine_options(Config.model_validate({"mode": mode, "rollout": {"cpus_per_worker": 1.0, **rollout}}))[
            "threads"]

    assert threads("sync") == "node"  # the learner idles while the engine rolls out: all the cores
    assert threads("async") == 1  # the learner learns beside it: only the CPUs Ray gives the worker
    assert threads("async", cpus_per_worker=3.0) == 3 and threads("async", cpus_per_worker=0.5) == 1
    assert threads("sync", engine_threads=1) == 1 and threads("async", engine_threads=2) == 2  # explicit wins
    with pytest.raises(ValueError, match="engine_threads"):
        Config.model_validate({"rollout": {"engine_threads": 0}})


def test_a_temperature_vllm_would_refuse_is_refused_with_its_key() -> None:
    with pytest.raises(ValueError, match="temperature"):
        Config.model_validate({"rollout": {"temperature": 3.0}})
    assert Config.model_validate({"rollout": {"temperature": 2.0}}).rollout.temperature == 2.0


def test_block_size_auto_leaves_the_choice_to_the_engine_and_a_number_reaches_it() -> None:
    from reciprocity.evaluate import engine_options

    assert engine_options(Config())["block_size"] is None  # the engine picks: 32 on CPU, vLLM's own on GPU
    assert engine_options(Config(rollout={"block_size": 128}))["block_size"] == 128
    with pytest.raises(ValueError, match="block_size"):
        Config.model_validate({"rollout": {"block_size": 0}})


def test_a_checkpoint_of_an_older_fingerprint_resumes_when_its_config_matches(tmp_path: Path) -> None:
    """A checkpoint whose stored fingerprint came from an older definition (one that hashed a field
    now known to be bookkeeping) resumes if its own config.yaml matches; a real difference is refused."""
    import json

    cfg = Config(runs_dir=str(tmp_path / "a"))
    tmp = checkpoint.begin(tmp_path, 2)
    checkpoint.commit(tmp, checkpoint.State(2, 2, "run", "0123456789abcdef", {}), cfg, keep=2)
    assert json.loads((checkpoint.latest(tmp_path) / "state.json").read_text())["fingerprint"] == "0123456789abcdef"
    assert checkpoint.load(tmp_path, Config(runs_dir=str(tmp_path / "b")))[1].iteration == 2
    with pytest.raises(ConfigError, match="method.beta"):
        checkpoint.load(tmp_path, Config(method={"beta": 0.9}))


def test_checkpoint_commit_is_atomic_and_refuses_other_config(tmp_path: Path) -> None:
    cfg = Config()
    for it in (2, 4, 6):
        tmp = checkpoint.begin(tmp_path, it)
        (tmp / "payload").write_text(str(it))
        checkpoint.commit(tmp, checkpoint.State(it, it, "run", cfg.fingerprint(), {}), cfg, keep=2)
    # a crash mid-write leaves a temp dir behind: it is never taken for a checkpoint
    (checkpoint.begin(tmp_path, 8) / "payload").write_text("partial")
    path, state = checkpoint.load(tmp_path, cfg)
    assert state.iteration == 6 and (path / "payload").read_text() == "6"
    assert sorted(p.name for p in checkpoint.checkpoints_dir(tmp_path).glob("it-*")) == ["it-000004", "it-000006"]
    with pytest.raises(ConfigError, match="method.beta"):
        checkpoint.load(tmp_path, Config(method={"beta": 0.9}))
