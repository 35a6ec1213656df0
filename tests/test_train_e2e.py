"""The training job end to end on the tiny model: in-process with a local Ray, resume from a
checkpoint, and the metrics in MLflow."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import tiny_overrides

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def test_train_two_iterations_then_resume(ray_local, tiny_model_dir: Path, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from reciprocity import checkpoint
    from reciprocity.config import load_config
    from reciprocity.train import run

    overrides = tiny_overrides(tiny_model_dir, tmp_path)
    # evaluated after every update; frozen into the buffer every second: v1 is evaluated, not frozen
    evaluation = ["evaluation.every=1", "evaluation.games=2",
                  "evaluation.opponents=[scripted:always_defect, self]", "buffer.snapshot_every=2"]
    cfg = load_config(Path("configs/smoke.yaml"), [*overrides, *evaluation])
    history = run(cfg)
    assert [h["iteration"] for h in history] == [0, 1]
    assert [h["version"] for h in history] == [1, 2]  # a new version published and probed each iteration
    assert all(h["probe_error"] < cfg.rollout.probe_tolerance for h in history)
    assert all(h["games"] == 4 and h["generated_tokens"] > 0 for h in history)
    run_dir = tmp_path / "runs" / "tiny"
    ckpt = checkpoint.latest(run_dir)
    assert ckpt is not None and ckpt.name == "it-000002"

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("reciprocity").experiment_id])
    assert len(runs) == 1
    run_id = runs[0].info.run_id
    coop = client.get_metric_history(run_id, "cooperation_rate")
    assert [m.step for m in coop] == [0, 1]
    assert 0.0 <= coop[0].value <= 1.0
    assert client.get_metric_history(run_id, "learner/grad_norm")

    # periodic evaluation after each iteration: the agent's figures against each opponent
    assert [h["snapshot"] for h in history] == [0, 1]
    assert all(0.0 <= h["eval/always_defect/cooperation_rate"] <= 1.0 for h in history)
    assert history[1]["eval/always_defect/opponent_return_per_round"] >= history[1][
        "eval/always_defect/return_per_round"]  # always-defect never scores less than its opponent
    assert "eval/self/return_per_round" in history[1]
    assert [m.step for m in client.get_metric_history(run_id, "eval/self/return_per_round")] == [0, 1]

    # artifacts: config, the evaluated v1, the snapshot and final v2, the eval transcripts, the curves
    def listing(path: str = "") -> set[str]:
        return {f.path for f in client.list_artifacts(run_id, path)}

    assert {"config.yaml", "adapters", "transcripts", "plots"} <= listing()
    assert {"adapters/v1", "adapters/v2"} <= listing("adapters")
    assert "adapters/v2/adapter_model.safetensors" in listing("adapters/v2")
    assert listing("transcripts") == {"transcripts/eval-it0001.html", "transcripts/eval-it0002.html"}
    assert listing("plots") == {"plots/curves.png"}
    page = Path(client.download_artifacts(run_id, "transcripts/eval-it0002.html", str(tmp_path))).read_text()
    assert "always_defect" in page and 'class="gen"' in page and "<script" not in page

    # resume: one more iteration continues the same MLflow run from the checkpoint
    # (evaluated every second update now: not after the third)
    cfg3 = load_config(Path("configs/smoke.yaml"), [*overrides, *evaluation, "evaluation.every=2", "iterations=3"])
    history3 = run(cfg3, resume=run_dir)
    assert [h["iteration"] for h in history3] == [2]
    assert history3[0]["version"] == 3
    assert not [k for k in history3[0] if k.startswith("eval/")]
    assert [m.step for m in client.get_metric_history(run_id, "cooperation_rate")] == [0, 1, 2]
    assert len(client.search_runs([runs[0].info.experiment_id])) == 1

    # exploiter training: a fresh naive learner against the evaluated v1 of that run (run:ID@1)
    exploit = [*tiny_overrides(tiny_model_dir, tmp_path, run_name="exploit"), "iterations=1", "checkpoint.every=1",
               f"opponent=run:{run_id}@1", "method.name=naive", "buffer.enabled=false"]
    hx = run(load_config(Path("configs/exploit_ipd_cpu.yaml"), exploit))
    assert hx[0]["self_play_games"] == 0 and hx[0]["games"] == 4  # every game against the target
    assert {"learner_return_per_round", "opponent_return_per_round"} <= set(hx[0])
    assert hx[0]["version"] == 1
    exploit_run = [r for r in client.search_runs([runs[0].info.experiment_id]) if r.info.run_name == "exploit"]
    assert client.get_metric_history(exploit_run[0].info.run_id, "opponent_return_per_round")
