"""Security defaults: what listens where, and where secrets may go.

- A local Ray (`reciprocity.launcher.init_ray` without an address) runs no dashboard and every one of
  its servers (GCS, raylet, object manager, core workers, agents) listens on loopback only: the
  sockets of the whole process tree are listed. (Ray 2.60 left to itself listens on 0.0.0.0 / ::.)
- `make mlflow-ui` serves on 127.0.0.1 (the recipe parsed with MLflow's own command-line parser).
- ray_cluster.yaml opens nothing to the world beyond Ray's ssh rule: no security group of its own,
  no port rules, no node-level network overrides (the dashboard's and MLflow's loopback binding is
  checked in tests/test_cluster_yaml.py).
- API keys come only from environment variables and are redacted from logs, errors, MLflow params,
  tags and artifacts (a real MLflow store, read back) and from what Ray passes to actors.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from support import CLUSTER_YAML, find_command, parse_click

from actors.redact import (
    MASK,
    RedactingFilter,
    install_log_redaction,
    is_secret_name,
    redact_mapping,
    redact_text,
    register_secret,
)

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}

LIST_SOCKETS = r"""
import json, time, psutil, ray
from reciprocity.launcher import init_ray
init_ray(None)
@ray.remote
def ping():
    return ray.util.get_node_ip_address()
node_ip = ray.get(ping.remote())  # a worker process exists and answers
time.sleep(1)
me = psutil.Process()
sockets = []
for p in [me, *me.children(recursive=True)]:
    try:
        sockets += [(p.name(), c.laddr.ip, c.laddr.port) for c in p.net_connections(kind="inet")
                    if c.status == psutil.CONN_LISTEN]
    except psutil.NoSuchProcess:
        pass
print(json.dumps({"node_ip": node_ip, "gcs": ray.get_runtime_context().gcs_address, "sockets": sockets}))
ray.shutdown()
"""


@pytest.mark.slow
def test_local_ray_listens_on_loopback_only() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    r = subprocess.run([sys.executable, "-c", LIST_SOCKETS], capture_output=True, text=True, cwd=ROOT, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    sockets = out["sockets"]
    names = {name for name, _, _ in sockets}
    assert {"gcs_server", "raylet"} <= names, sockets  # the listing sees Ray's servers
    exposed = [s for s in sockets if s[1] not in LOOPBACK]
    assert not exposed, f"listening beyond loopback: {exposed}"
    assert out["node_ip"] == "127.0.0.1" and out["gcs"].startswith("127.0.0.1:")
    assert 8265 not in {port for _, _, port in sockets}  # no dashboard


def test_make_mlflow_ui_binds_loopback() -> None:
    import click
    from mlflow.cli import cli

    r = subprocess.run(["make", "-n", "mlflow-ui"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr
    argv = find_command([line for line in r.stdout.splitlines() if "mlflow" in line and " ui" in line], "mlflow", "ui")
    ui = cli.get_command(click.Context(cli), "ui")  # an alias of `mlflow server`
    assert ui is not None
    params = parse_click(ui, argv)
    assert params["host"] == "127.0.0.1" and params["port"] == 5000


def test_cluster_yaml_opens_no_port_to_the_world() -> None:
    raw = yaml.safe_load(CLUSTER_YAML.read_text())
    # Ray's AWS provider then creates its default group: ssh from anywhere, all traffic between the
    # cluster's own nodes; nothing here widens it.
    assert "security_group" not in raw["provider"]
    for name, node_type in raw["available_node_types"].items():
        cfg = node_type["node_config"]
        for key in ("SecurityGroupIds", "SecurityGroups", "NetworkInterfaces"):
            assert key not in cfg, (name, key)
    text = CLUSTER_YAML.read_text()
    assert "0.0.0.0" not in text and "::/0" not in text and "IpPermissions" not in text
    for line in raw["head_start_ray_commands"]:
        assert "--dashboard-host=127.0.0.1" in line or "dashboard-host" not in line
        assert "--ray-client-server-port" not in line and "--metrics-export-port" not in line


# ----------------------------------------------------------------------------- secrets
SECRET = "sk-live-9f8e7d6c5b4a3210"


def test_secret_names() -> None:
    secret = ["api_key", "OPENAI_API_KEY", "APIKey", "hf_token", "HF_TOKEN", "password", "db-passwd", "client_secret",
              "AWS_SECRET_ACCESS_KEY", "private_key", "Authorization", "credentials"]
    plain = ["max_tokens", "micro_batch_tokens", "keep", "api_key_env", "key", "TOKENIZERS_PARALLELISM",
             "RAY_AUTH_MODE", "model", "base_url", "tokens_per_s", "monkey"]
    assert [n for n in secret if not is_secret_name(n)] == []
    assert [n for n in plain if is_secret_name(n)] == []


def test_redact_text_and_mapping(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOME_SERVICE_TOKEN", "tok-8c1d2e3f4a5b")
    text = (f"calling https://alice:hunter2pw@api.example.com/v1?api_key=abc123&x=1 with Bearer {SECRET}\n"
            f"api_key: {SECRET}\nmax_tokens: 16\n"
            '{"password": "p4ssw0rd!", "model": "m"}\n'
            "Authorization: Basic dXNlcjpwYXNz\ntoken tok-8c1d2e3f4a5b")
    clean = redact_text(text)
    for secret in (SECRET, "hunter2pw", "abc123", "p4ssw0rd!", "dXNlcjpwYXNz", "tok-8c1d2e3f4a5b"):
        assert secret not in clean, (secret, clean)
    assert "max_tokens: 16" in clean and '"model": "m"' in clean and "x=1" in clean and "api.example.com" in clean
    assert redact_mapping({"api": {"api_key": "x", "api_key_env": "OPENAI_API_KEY", "n": 3, "url": "https://u:p@h/"}}) \
        == {"api": {"api_key": MASK, "api_key_env": "OPENAI_API_KEY", "n": 3, "url": f"https://{MASK}@h/"}}
    register_secret("plain-looking-value")
    assert redact_text("the value is plain-looking-value.") == f"the value is {MASK}."


def test_log_redaction(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("reciprocity.test_security")
    flt = install_log_redaction(logger)
    assert install_log_redaction(logger) is flt and isinstance(flt, RedactingFilter)
    with caplog.at_level(logging.INFO, logger=logger.name):
        logger.info("request with header Authorization: Bearer %s failed", SECRET)
    assert SECRET not in caplog.text and "Bearer ***" in caplog.text
    logger.removeFilter(flt)


def test_ray_passes_no_secret_to_actors() -> None:
    from reciprocity.launcher import PASSED_ENV

    assert not [k for k in PASSED_ENV if is_secret_name(k)]


def test_mlflow_params_tags_and_artifacts_hold_no_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A config that carries secrets where the schema allows free values, and a key in the
    environment: the run's params, tags and config artifact in a real MLflow store hold none."""
    from mlflow.tracking import MlflowClient

    from reciprocity.config import Config
    from reciprocity.tracking import Tracker

    env_key = "sk-env-0a1b2c3d4e5f6a7b"
    monkeypatch.setenv("OPENAI_API_KEY", env_key)
    cfg = Config(
        runs_dir=str(tmp_path / "runs"),
        game={"options": {"api_key": SECRET, "endpoint": "https://bob:pw12345678@host/v1", "note": env_key}},
        evaluation={"opponents": [f"api:https://host/v1?api_key={SECRET}#gpt"]},
        tracking={"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "system_metrics": False},
    )
    flat = cfg.flat()
    assert flat["game.options.api_key"] == MASK and "pw12345678" not in flat["game.options.endpoint"]
    tracker = Tracker(cfg, tags={"note": f"launched with {env_key}"})
    try:
        tracker.log_text(yaml.safe_dump(cfg.model_dump()), "config.yaml")
        tracker.set_tag("endpoint", "https://bob:pw12345678@host/v1")
        run = MlflowClient(tracker.uri).get_run(tracker.run_id)
        artifact = Path(MlflowClient(tracker.uri).download_artifacts(tracker.run_id, "config.yaml", str(tmp_path)))
        stored: dict[str, Any] = {"params": run.data.params, "tags": run.data.tags, "artifact": artifact.read_text()}
    finally:
        tracker.finish()
    blob = json.dumps(stored)
    for secret in (SECRET, env_key, "pw12345678"):
        assert secret not in blob, secret
    assert stored["params"]["method.beta"] == "0.5" and "rollout:" in stored["artifact"]  # the rest is there
