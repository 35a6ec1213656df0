"""`reciprocity compare`: training runs side by side from a real MLflow store (sqlite, temp dir)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from reciprocity.compare import last_values, main, markdown_table


def make_run(uri: str, name: str, game: str, coop: list[float], eval_every: int = 2) -> str:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("t") or None
    exp_id = exp.experiment_id if exp else client.create_experiment("t")
    run = client.create_run(exp_id, run_name=name)
    rid = run.info.run_id
    client.log_param(rid, "game.name", game)
    for it, c in enumerate(coop):
        client.log_metric(rid, "cooperation_rate", c, step=it)
        client.log_metric(rid, "return_per_round", 1 + 2 * c, step=it)
        if it % eval_every == 0:
            client.log_metric(rid, "eval/always_defect/p_coop_given_opp_defect", c / 2, step=it)
    client.set_terminated(rid)
    return rid


def test_last_values_take_the_highest_step_not_the_last_logged() -> None:
    got = last_values({"a": [(3, 0.9), (1, 0.1), (2, 0.5)], "b": []})
    assert got == {"a": 0.9, "b": None}


def test_markdown_table_marks_missing_figures() -> None:
    rows = {"aa": {"iterations": 12, "minutes": 30.25, "last": {"x": 0.12345, "y": None}}}
    table = markdown_table(rows, ["x", "y"])
    assert table.splitlines()[2] == "| aa | 12 | 30.2 | 0.123 | - |"


def test_compare_reads_histories_and_writes_plot_table_json(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    naive = make_run(uri, "naive", "ipd", [0.5, 0.4, 0.3, 0.2, 0.1])
    aa = make_run(uri, "aa", "ipd", [0.5, 0.6, 0.7, 0.8, 0.85])
    out = tmp_path / "cmp"
    assert main([naive, aa], out, uri) == 0
    summary = json.loads((out / "comparison.json").read_text())
    assert summary["naive"]["iterations"] == 5
    assert summary["naive"]["last"]["cooperation_rate"] == 0.1
    assert summary["aa"]["last"]["cooperation_rate"] == 0.85
    assert summary["aa"]["last"]["eval/always_defect/p_coop_given_opp_defect"] == 0.85 / 2  # logged at steps 0, 2, 4
    assert summary["aa"]["last"]["p_coop_given_opp_coop"] is None  # never logged
    assert [v for _, v in summary["naive"]["history"]["cooperation_rate"]] == [0.5, 0.4, 0.3, 0.2, 0.1]
    png = (out / "comparison.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "| aa | 5 |" in (out / "comparison.md").read_text()


def test_compare_refuses_runs_of_different_games_and_unknown_ids(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ipd = make_run(uri, "a", "ipd", [0.5])
    split = make_run(uri, "b", "split_nocomm", [0.5])
    assert main([ipd, split], tmp_path / "x", uri) == 2
    assert not (tmp_path / "x").exists()
    assert main(["0" * 32], tmp_path / "y", uri) == 2
    assert main([], tmp_path / "z", uri) == 2


def test_compare_cli_one_line_error_for_an_unknown_run(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"tracking: {{uri: 'sqlite:///{tmp_path / 'mlflow.db'}'}}\n")
    proc = subprocess.run([sys.executable, "-m", "reciprocity", "compare", "deadbeef", "--config", str(cfg),
                           "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "deadbeef" in last and "Traceback" not in proc.stderr


def test_compare_trust_and_split_runs_counts_iterations_from_its_own_figures(tmp_path: Path) -> None:
    """A negotiation game logs no cooperation rate: its iterations come from its own figures."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    exp_id = client.create_experiment("t")
    ids = []
    for name, honest in (("naive", [0.5, 0.6]), ("aa", [0.5, 0.9])):
        rid = client.create_run(exp_id, run_name=name).info.run_id
        client.log_param(rid, "game.name", "trust_and_split")
        for it, h in enumerate(honest):
            client.log_metric(rid, "efficiency", 0.5, step=it)
            client.log_metric(rid, "honest_claim_rate", h, step=it)
        client.log_metric(rid, "eval/truthful/opponent_return_per_round", 20.0, step=1)
        client.set_terminated(rid)
        ids.append(rid)
    out = tmp_path / "cmp"
    assert main(ids, out, uri) == 0
    summary = json.loads((out / "comparison.json").read_text())
    assert summary["naive"]["iterations"] == 2 and summary["aa"]["last"]["honest_claim_rate"] == 0.9
    assert summary["aa"]["last"]["eval/truthful/opponent_return_per_round"] == 20.0
    assert summary["aa"]["last"]["return_per_round"] is None  # never logged here


def make_exploit_run(uri: str, name: str, mine: list[float], theirs: list[float]) -> str:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("t")
    exp_id = exp.experiment_id if exp else client.create_experiment("t")
    rid = client.create_run(exp_id, run_name=name).info.run_id
    client.log_param(rid, "game.name", "split_nocomm")
    client.log_param(rid, "opponent", f"run:{name}@9")
    for it, (a, b) in enumerate(zip(mine, theirs, strict=True)):
        client.log_metric(rid, "learner_return_per_round", a, step=it)
        if it != 1:  # a step without the target's figure has no gain
            client.log_metric(rid, "opponent_return_per_round", b, step=it)
        client.log_metric(rid, "efficiency", 0.6, step=it)
    client.set_terminated(rid)
    return rid


def test_exploiter_runs_get_both_sides_and_the_gain(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    vs_aa = make_exploit_run(uri, "vs_aa", [80.0, 85.0, 97.0], [82.0, 80.0, 78.0])
    vs_naive = make_exploit_run(uri, "vs_naive", [86.0, 87.0, 87.0], [87.0, 87.0, 87.0])
    out = tmp_path / "cmp"
    assert main([vs_aa, vs_naive], out, uri) == 0
    summary = json.loads((out / "comparison.json").read_text())
    assert summary["vs_aa"]["history"]["exploiter_gain_per_round"] == [[0, -2.0], [2, 19.0]]
    assert summary["vs_aa"]["last"]["exploiter_gain_per_round"] == 19.0
    assert summary["vs_naive"]["last"]["exploiter_gain_per_round"] == 0.0
    assert summary["vs_aa"]["opponent"] == "run:vs_aa@9"
    assert "cooperation_rate" not in summary["vs_aa"]["history"]  # the exploit figures, not the training ones
    training = make_run(uri, "naive", "split_nocomm", [0.5])
    assert main([vs_aa, training], tmp_path / "mixed", uri) == 2  # an exploiter and a training run: refused
