"""ray_cluster.yaml, checked offline with Ray's own cluster-config validation.

`prepare_config` needs neither AWS credentials nor network (nor boto3): for `provider.type: aws` it
only merges the defaults file Ray ships (ray/autoscaler/aws/defaults.yaml) under our keys, prepends
setup_commands to the head/worker setup lists and fills per-node-type worker bounds. The parts of
`ray up` that talk to AWS (key pair, IAM role, subnets, security groups, AMI) live in the provider's
`bootstrap_config`, which these tests do not call. `validate_config` then checks the merged config
against ray/autoscaler/ray-schema.json, whose top level and node types forbid unknown keys: a
misspelled key fails. The start commands are also parsed by the real `ray start` and `mlflow server`
command-line parsers (click, parse only), so a misspelled flag fails too.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import click
import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config
from support import CLUSTER_YAML, ROOT, find_command, find_commands, parse_click


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def validated(config: dict[str, Any]) -> dict[str, Any]:
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_validates_with_rays_schema(raw: dict[str, Any]) -> None:
    cfg = validated(raw)
    assert cfg["provider"]["type"] == "aws"
    assert cfg["head_node_type"] == "head"
    gpu = cfg["available_node_types"]["gpu_worker"]
    assert gpu["resources"]["GPU"] >= 1
    assert 0 <= gpu["min_workers"] <= gpu["max_workers"] <= cfg["max_workers"]
    assert "GPU" not in cfg["available_node_types"]["head"]["resources"]
    # Our own lists replace Ray's defaults (which would pip-install a nightly Ray into the system).
    assert not any("ray-wheels" in c for c in cfg["head_setup_commands"] + cfg["worker_setup_commands"])


@pytest.mark.parametrize("where", ["top", "node_type", "auth"])
def test_misspelled_key_fails_validation(raw: dict[str, Any], where: str) -> None:
    bad = copy.deepcopy(raw)
    if where == "top":
        bad["head_start_ray_comands"] = bad.pop("head_start_ray_commands")
    elif where == "node_type":
        bad["available_node_types"]["gpu_worker"]["min_worker"] = 1
    else:
        bad["auth"]["ssh_usr"] = "ubuntu"
    with pytest.raises(jsonschema.ValidationError, match="Additional properties"):
        validated(bad)


def test_dashboard_binds_loopback(raw: dict[str, Any]) -> None:
    from ray.scripts.scripts import start

    head = parse_click(start, find_command(raw["head_start_ray_commands"], "ray", "start"))
    assert head["head"] and head["dashboard_host"] == "127.0.0.1"
    assert head["autoscaling_config"] == "~/ray_bootstrap_config.yaml"
    worker = parse_click(start, find_command(raw["worker_start_ray_commands"], "ray", "start"))
    assert not worker["head"] and worker["address"] == "$RAY_HEAD_IP:6379"
    text = CLUSTER_YAML.read_text()
    assert "0.0.0.0" not in text


def test_mlflow_server_binds_loopback_with_absolute_stores(raw: dict[str, Any]) -> None:
    from mlflow.cli import cli

    line = next(c for c in raw["head_start_ray_commands"] if "mlflow" in c)
    argv = find_command([line], "mlflow", "server")
    params = parse_click(cli.commands["server"], argv)
    assert params["host"] == "127.0.0.1" and params["port"] == 5000
    assert params["backend_store_uri"] == "sqlite:////home/ubuntu/reciprocity-runs/mlflow.db"
    assert params["artifacts_destination"] == "/home/ubuntu/reciprocity-runs/artifacts"
    # In the background, detached from the ssh session, and only when none already answers.
    assert line.rstrip().endswith("&") and "nohup" in line and "/health" in line
    # The runs directory exists before the server starts.
    assert any("mkdir -p /home/ubuntu/reciprocity-runs/artifacts" in c for c in raw["head_setup_commands"])


def test_every_node_installs_the_gpu_extra_and_the_model(raw: dict[str, Any]) -> None:
    cfg = validated(raw)
    assert raw["file_mounts"] == {"~/reciprocity": "."}
    assert ".gitignore" in raw["rsync_filter"]
    for key in ("head_setup_commands", "worker_setup_commands"):
        cmds = cfg[key]
        editable = [a for a in find_commands(cmds, "pip", "install") if "-e" in a]
        assert len(editable) == 1 and "$HOME/reciprocity[gpu]" in editable[0], editable
        prepare = find_command(cmds, "reciprocity", "model", "prepare")
        assert prepare[prepare.index("--out") + 1] == "/home/ubuntu/models/smollm2-135m-instruct"
        assert any("python3 -m venv ~/venv" in c for c in cmds)
    # The autoscaler (in the venv) needs boto3 to launch workers.
    assert ["boto3>=1.4.8"] in find_commands(cfg["head_setup_commands"], "pip", "install", "-q")
    # Ray and jobs run from the venv on every node.
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert all("source ~/venv/bin/activate" in c for c in raw[key] if "ray " in c)


def test_only_remote_home_paths(raw: dict[str, Any]) -> None:
    """No path of the machine the YAML was written on; absolute paths stay under /home/ubuntu."""
    text = CLUSTER_YAML.read_text()
    assert str(ROOT) not in text and "/work/" not in text and "/tmp/" not in text
    commands = [c for k, v in raw.items() if k.endswith("_commands") for c in v]
    for c in commands:
        for path in re.findall(r"(?<![\w:/.])/(?:home|root|Users|opt|srv|mnt)/[^\s\"']*", c):
            assert path.startswith("/home/ubuntu/"), (path, c)
    for remote in raw["file_mounts"]:
        assert remote.startswith(("~/", "/home/ubuntu/"))


def test_misspelled_flag_fails_parsing(raw: dict[str, Any]) -> None:
    from ray.scripts.scripts import start

    argv = find_command(raw["head_start_ray_commands"], "ray", "start")
    bad = [a.replace("--dashboard-host", "--dashboard-hots") for a in argv]
    with pytest.raises(click.UsageError, match="dashboard-hots"):
        parse_click(start, bad)
