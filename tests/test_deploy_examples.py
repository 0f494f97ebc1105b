"""examples/kubernetes: the manifests parse, every role's command line is one asyncfl accepts,
and the example experiment is one the cluster can train."""

import shlex
from pathlib import Path

import pytest
import yaml

from asyncfl import config
from asyncfl.cli import main
from asyncfl.cluster.tasks import build_objects

ROOT = Path(__file__).resolve().parents[1] / "examples" / "kubernetes"


def _documents():
    return [doc for path in sorted(ROOT.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc]


def _containers(doc):
    spec = doc["spec"]["template"]["spec"] if doc["kind"] in ("Deployment", "Job") else {}
    return spec.get("containers", [])


def _accepted(argv, monkeypatch) -> None:
    """argparse reads the arguments in order; a trailing --help exits 0 only if all before it parse."""
    monkeypatch.setenv("ASYNCFL_DATABASE_URL", "postgresql://u@h/db")
    assert argv[0] == "asyncfl"
    with pytest.raises(SystemExit) as stop:
        main([*argv[1:], "--help"])
    assert stop.value.code == 0, argv


def test_manifests_hold_the_topology():
    kinds = {(d["kind"], d["metadata"]["name"]) for d in _documents()}
    assert {
        ("Secret", "asyncfl-db"),
        ("Deployment", "asyncfl-coordinator"),
        ("Deployment", "asyncfl-aggregator"),
        ("Deployment", "asyncfl-selector"),
        ("Service", "asyncfl"),
        ("Job", "asyncfl-setup"),
    } <= kinds
    service = next(d for d in _documents() if d["kind"] == "Service")
    selectors = next(d for d in _documents() if d["metadata"]["name"] == "asyncfl-selector")
    assert service["spec"]["selector"] == selectors["spec"]["template"]["metadata"]["labels"]
    for doc in _documents():
        for container in _containers(doc):
            (env,) = [e for e in container["env"] if e["name"] == "ASYNCFL_DATABASE_URL"]
            assert env["valueFrom"]["secretKeyRef"] == {"name": "asyncfl-db", "key": "url"}


def test_every_command_line_parses(monkeypatch, capsys):
    commands = []
    for doc in _documents():
        for container in _containers(doc):
            if container.get("command") == ["sh", "-c"]:
                commands += [shlex.split(part) for part in container["args"][0].split("&&")]
            else:
                commands.append(container["args"])
    assert {c[3] for c in commands if c[1] == "serve"} == {"selector", "aggregator", "coordinator"}
    for argv in commands:
        _accepted(argv, monkeypatch)


def test_the_example_experiment_is_a_cluster_task():
    (cm,) = [d for d in _documents() if d["kind"] == "ConfigMap" and "experiment.yaml" in d["data"]]
    cfg = config.validate(yaml.safe_load(cm["data"]["experiment.yaml"]))
    assert build_objects(cfg).spec.scheduler.mode == "async"


def test_the_selectors_settings_are_valid_server_settings():
    from asyncfl.config import ServerConfig

    (config_map,) = [d for d in _documents() if d["metadata"]["name"] == "asyncfl-selector-settings"]
    settings = ServerConfig.model_validate(yaml.safe_load(config_map["data"]["selector.yaml"]))
    assert settings.checkin_rate_per_s == 4000
    selectors = next(
        d for d in _documents() if d["metadata"]["name"] == "asyncfl-selector" and d["kind"] == "Deployment"
    )
    (container,) = _containers(selectors)
    assert container["args"][container["args"].index("--server-config") + 1] == "/etc/asyncfl/selector.yaml"
