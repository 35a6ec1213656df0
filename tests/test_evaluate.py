"""`reciprocity evaluate`: scripted matrices against known game-theoretic facts, exploitability,
JSON/PNG/MLflow outputs (nested under a parent run), the CLI's errors, an API seat on a worker
without an LLM engine, and (slow) a matrix of the base model, a LoRA adapter and a scripted agent on
one shared vLLM worker."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from reciprocity import evaluate as ev
from reciprocity.cli import app
from reciprocity.config import Config

runner = CliRunner()


def config(tmp_path: Path, **rollout: Any) -> Config:
    cfg = Config()
    cfg.tracking.uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg.runs_dir = str(tmp_path / "runs")
    for k, v in rollout.items():
        setattr(cfg.rollout, k, v)
    return cfg


def parent_run(cfg: Config, tmp_path: Path) -> str:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(cfg.tracking.uri)
    exp = client.create_experiment("train", artifact_location=str(tmp_path / "artifacts"))
    return client.create_run(exp, run_name="train").info.run_id


def pair(result: dict[str, Any], a: str, b: str) -> dict[str, Any]:
    return next(p for p in result["pairs"] if p["agents"] == [a, b])


def check_nested_run(cfg: Config, result: dict[str, Any], parent: str) -> dict[str, float]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(cfg.tracking.uri)
    run = client.get_run(result["mlflow_run_id"])
    assert run.data.tags["mlflow.parentRunId"] == parent and run.info.status == "FINISHED"
    assert run.info.experiment_id == client.get_run(parent).info.experiment_id
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"evaluation.json", "heatmap.png"}
    assert json.loads(run.data.params["agents"]) == [a["spec"] for a in result["agents"]]
    return run.data.metrics


def check_files(result: dict[str, Any], out: Path) -> None:
    on_disk = json.loads((out / "evaluation.json").read_text())
    assert on_disk["return_matrix"] == result["return_matrix"] and on_disk["exploitability"] == result["exploitability"]
    assert (out / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- scripted matrices: no worker, envs.loop ---------------------------------------------------------
def test_ipd_scripted_matrix_facts(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    parent = parent_run(cfg, tmp_path)
    agents = ["always_cooperate", "scripted:always_defect", "tit_for_tat"]
    result = ev.evaluate("ipd", agents, 16, cfg=cfg, out=tmp_path / "out", parent_run=parent)
    names = [a["name"] for a in result["agents"]]
    assert names == ["always_cooperate", "always_defect", "tit_for_tat"]  # always_defect present: nothing added
    assert len(result["pairs"]) == 9 and {tuple(p["agents"]) for p in result["pairs"]} == {
        (a, b) for a in names for b in names}
    m = result["return_matrix"]
    assert m == [[3.0, 0.0, 3.0], [5.0, 1.0, 1.4], [3.0, 0.9, 3.0]]
    assert pair(result, "always_defect", "always_cooperate")["return_per_game"] == [50.0, 0.0]
    tft = pair(result, "tit_for_tat", "tit_for_tat")
    assert tft["cooperation_rate"] == [1.0, 1.0] and tft["p_coop_given_opp_coop"] == [1.0, 1.0]
    assert pair(result, "tit_for_tat", "always_defect")["p_coop_given_opp_defect"] == [0.0, 0.0]
    e = result["exploitability"]
    assert result["exploiter"] == "always_defect"
    assert e["always_cooperate"] == {"best_responder": "always_defect", "responder_return": 5.0, "return": 0.0,
                                     "loss": 5.0, "loss_vs_exploiter": 5.0}
    assert e["always_defect"]["loss"] == 0.0 and e["always_defect"]["loss_vs_exploiter"] == 0.0
    assert e["tit_for_tat"]["loss"] == 0.0 and e["tit_for_tat"]["loss_vs_exploiter"] == pytest.approx(0.5)
    assert result["mean_return_per_round"]["always_defect"] == pytest.approx(7.4 / 3)
    check_files(result, tmp_path / "out")
    metrics = check_nested_run(cfg, result, parent)
    assert metrics["exploitability/always_cooperate"] == 5.0
    assert metrics["pair/always_defect_vs_tit_for_tat/return_per_round/alice"] == pytest.approx(1.4)


def test_exploiter_is_added_unless_present_or_declined(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    result = ev.evaluate("split_nocomm", ["welfare_maximising", "random"], 8, cfg=cfg, track=False)
    assert [a["name"] for a in result["agents"]] == ["welfare_maximising", "random", "greedy"]
    assert result["exploiter"] == "greedy" and result["mlflow_run_id"] is None and "files" not in result
    assert pair(result, "welfare_maximising", "welfare_maximising")["efficiency"] == pytest.approx(1.0)
    m, names = result["return_matrix"], [a["name"] for a in result["agents"]]
    for j, name in enumerate(names):  # the definition: b = the responder that scores most against j
        e, b = result["exploitability"][name], max(range(3), key=lambda i, j=j: m[i][j])
        assert (e["best_responder"], e["loss"]) == (names[b], pytest.approx(m[b][j] - m[j][b]))
        assert e["loss_vs_exploiter"] == pytest.approx(m[2][j] - m[j][2])
    assert result["exploitability"]["welfare_maximising"]["loss_vs_exploiter"] > 0  # greedy takes more
    bare = ev.evaluate("ipd", ["tit_for_tat", "grim_trigger", "tit_for_tat"], 4, cfg=cfg, track=False,
                       add_exploiter=False)
    assert [a["name"] for a in bare["agents"]] == ["tit_for_tat", "grim_trigger", "tit_for_tat#2"]
    assert bare["exploiter"] is None and "loss_vs_exploiter" not in bare["exploitability"]["grim_trigger"]
    assert bare["return_matrix"] == [[3.0] * 3] * 3


def test_cli_evaluate_and_its_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    out = tmp_path / "cli"
    args = ["evaluate", "--game", "trust_and_split", "--agents", "truthful", "always_claim_10", "--games", "4",
            "--out", str(out), "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [a["name"] for a in data["agents"]] == ["truthful", "always_claim_10", "liar"]
    greedy, trusting = pair(data, "always_claim_10", "truthful")["return_per_round"]
    assert greedy > trusting  # keeping 10 whatever the hands exploits the truthful player
    check_files(data, out)
    unknown = runner.invoke(app, ["evaluate", "no_such_strategy", "--games", "2"])
    assert unknown.exit_code == 2 and "accepted forms: scripted:NAME" in unknown.stderr
    for bad, message in [
        (["--agents", "tit_for_tat", "human"], "reciprocity serve"),
        (["--agents", "tit_for_tat", "gpt:4"], "accepted forms"),
        (["--agents", "tit_for_tat", "-o", "colour=red"], "valid options"),
        (["--agents", "tit_for_tat", "--parent-run", "f" * 32], "error: "),
        ([], "no agents given"),
    ]:
        r = runner.invoke(app, ["evaluate", "--games", "2", "--out", str(tmp_path / "bad"), *bad])
        assert r.exit_code == 2 and message in r.stderr and r.stderr.count("\n") == 1, (bad, r.output)
    assert not (tmp_path / "bad").exists()  # nothing written for a refused evaluation


def test_play_routes_other_agents_through_evaluate(monkeypatch: pytest.MonkeyPatch) -> None:
    """`reciprocity play` with an LLM seat calls evaluate.play_agents for both seat orders."""
    refused = runner.invoke(app, ["play", "--agents", "human", "tit_for_tat", "--json"])
    assert refused.exit_code == 2 and "reciprocity serve" in refused.stderr
    calls: list[tuple[Any, ...]] = []

    async def fake(game: str, agents: tuple[Any, Any], games: int, **kw: Any) -> list[dict[str, Any]]:
        calls.append((game, tuple(a.spec for a in agents), games, kw["seed"]))  # parsed by reciprocity.agents
        return [{"return_per_game": [1.0, 2.0]}, {"return_per_game": [2.0, 1.0]}]

    monkeypatch.setattr(ev, "play_agents", fake)
    result = runner.invoke(app, ["play", "--agents", "base", "scripted:tit_for_tat", "--games", "3", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert calls == [("ipd", ("base", "scripted:tit_for_tat"), 3, 0)]
    assert [p["agents"] for p in out["pairs"]] == [["base", "scripted:tit_for_tat"], ["scripted:tit_for_tat", "base"]]


def test_engine_chatter_goes_to_stderr(capfd: pytest.CaptureFixture[str]) -> None:
    """vLLM logs to fd 1 (and its engine processes inherit it): --json output must stay clean."""
    import os

    with ev.stdout_to_stderr():
        os.write(1, b"engine log line\n")
    os.write(1, b"{}\n")
    out, err = capfd.readouterr()
    assert out == "{}\n" and err == "engine log line\n"


# -- an API seat: a worker with no LLM engine ---------------------------------------------------------
@pytest.fixture()
def always_a_endpoint() -> Iterator[str]:
    """An OpenAI-compatible endpoint whose model always answers <A> (cooperates in IPD)."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers["Content-Length"]))
            body = json.dumps({"choices": [{"message": {"role": "assistant", "content": "<A>"}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_api_seat_without_llm_engine(
    tmp_path: Path, model_dir: Path, always_a_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("RECIPROCITY_API_KEY", "OPENAI_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    cfg = config(tmp_path)
    cfg.model.path = str(model_dir)  # the tokenizer of the (unused) chat template
    agents = [f"api:{always_a_endpoint}#nice-model", "tit_for_tat"]
    assert ev.worker_config(cfg, ev.resolve("ipd", agents, cfg))["engine"] is None  # actors.engine.NoEngine
    result = ev.evaluate("ipd", agents, 2, cfg=cfg, track=False)
    assert [a["name"] for a in result["agents"]] == ["nice-model", "tit_for_tat", "always_defect"]
    assert result["return_matrix"][0] == [3.0, 3.0, 0.0]  # the API model cooperates whatever happens
    assert result["exploitability"]["nice-model"]["loss"] == 5.0
    api_pair = pair(result, "nice-model", "always_defect")
    assert api_pair["cooperation_rate"] == [1.0, 0.0] and api_pair["invalid_rate"] == [0.0, 0.0]
    assert api_pair["generated_tokens"] == 0  # text seats: no tokens


# -- LLM seats on one vLLM worker (tiny random Llama) -------------------------------------------------
@pytest.fixture(scope="module")
def llm_setup(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from vllm_support import LoopThread, make_adapter

    from actors.worker import RolloutWorker

    tmp = tmp_path_factory.mktemp("eval-llm")
    adapter = make_adapter(tiny_model_dir, tmp / "lora-a", seed=3)
    cfg = config(tmp, max_tokens=8)
    cfg.model.path = str(tiny_model_dir)
    agents = ev.resolve("ipd", ["base", f"adapter:{adapter}", "tit_for_tat"], cfg)
    loop = LoopThread()
    worker = RolloutWorker(ev.worker_config(cfg, agents))
    yield {"cfg": cfg, "agents": agents, "loop": loop, "worker": worker, "tmp": tmp}
    worker.shutdown()
    loop.close()


@pytest.mark.slow
def test_llm_matrix_on_a_shared_worker(llm_setup: dict[str, Any]) -> None:
    cfg, loop, worker, tmp = llm_setup["cfg"], llm_setup["loop"], llm_setup["worker"], llm_setup["tmp"]
    parent = parent_run(cfg, tmp)
    seen: list[dict[str, float]] = []
    result = loop.run(ev.evaluate_async("ipd", llm_setup["agents"], 4, cfg=cfg, out=tmp / "out",
                                        parent_run=parent, worker=worker, on_progress=seen.append,
                                        progress_every_s=0.05))
    playing = [p for p in seen if p["planned"]]  # before: the engine was starting
    assert playing, "no progress reported while the games ran"  # `reciprocity evaluate` prints these
    assert all(p["planned"] == 16 * 4 for p in playing)  # every pair's games go to the worker here
    done = [p["games"] for p in playing]
    assert done == sorted(done) and done[-1] <= 16 * 4
    names = [a["name"] for a in result["agents"]]
    assert names == ["base", "lora-a", "tit_for_tat", "always_defect"]
    assert len(result["pairs"]) == 16 and len(result["return_matrix"]) == 4
    assert all(len(row) == 4 for row in result["return_matrix"])
    for p in result["pairs"]:
        llm_seats = sum(n in ("base", "lora-a") for n in p["agents"])
        assert (p["generated_tokens"] > 0) == (llm_seats > 0)
        assert p["invalid_rate"] == [0.0, 0.0]  # guided decisions are always valid
        assert 0.0 <= p["cooperation_rate"][0] <= 1.0
    assert pair(result, "always_defect", "tit_for_tat")["return_per_game"] == [14.0, 9.0]  # scripted on the worker
    for opp in ("base", "lora-a"):  # tit-for-tat copies the LLM's previous move, whatever it is
        p = pair(result, "tit_for_tat", opp)
        assert p["p_coop_given_opp_defect"][0] in (0.0, None) and p["p_coop_given_opp_coop"][0] in (1.0, None)
        assert pair(result, "always_defect", opp)["return_per_round"][0] >= 1.0  # D vs anything earns >= 1
    check_files(result, tmp / "out")
    check_nested_run(cfg, result, parent)
    assert worker.stats()["adapters"] == [llm_setup["agents"][1].adapter.key]
    # `reciprocity play` machinery on the same worker: one pair, both seat orders
    figures = loop.run(ev.play_agents("ipd", ("base", "always_cooperate"), 2, cfg=cfg, worker=worker))
    assert len(figures) == 2  # always_cooperate earns 3 for each round the base model cooperates
    assert figures[0]["return_per_game"][1] == pytest.approx(figures[0]["cooperation_rate"][0] * 30.0)
    with pytest.raises(ValueError, match="another event loop"):
        ev.evaluate("ipd", ["base"], 1, cfg=cfg, worker=worker)
