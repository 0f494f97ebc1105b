"""`asyncfl cluster up`'s preparation with several --config: one task each, each task's tokens
in its own file and bound to that task; clashing names refused before anything is written."""

import argparse

import pytest
import yaml
from cluster_helpers import FEDASYNC, FEDBUFF, fetch

from asyncfl.cluster.arguments import add_cluster_command
from asyncfl.cluster.up import prepare
from asyncfl.config import ConfigError
from asyncfl.server.store import hash_token


def _config(tmp_path, name: str, run: dict, hidden: int) -> str:
    tree = {
        "name": name,
        "seed": 0,
        "data": {"num_clients": 4, "partition": {"kind": "iid"}},
        "model": {"name": "mlp", "hidden": [hidden]},
        "trainer": {"lr": 0.1, "batch_size": 16, "local_steps": 2},
        "runs": [run],
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return str(path)


def _up_args(tmp_path, *configs: str, extra: tuple[str, ...] = ()) -> argparse.Namespace:
    argv = ["cluster", "up", "--clients", "2", "--tokens-file", str(tmp_path / "tokens.txt"), *extra]
    for config in configs:
        argv += ["--config", config]
    parser = argparse.ArgumentParser()
    add_cluster_command(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def _tokens(path) -> list[tuple[str, str]]:
    return [tuple(line.split("\t")) for line in path.read_text().splitlines()]


def test_each_config_is_a_task_with_its_own_tokens_file(pg_url, tmp_path):
    a = _config(tmp_path, "a", FEDBUFF, 16)
    b = _config(tmp_path, "b", FEDASYNC, 32)
    files = prepare(pg_url, _up_args(tmp_path, a, b))
    assert files == {"fedbuff": tmp_path / "tokens-fedbuff.txt", "fedasync": tmp_path / "tokens-fedasync.txt"}
    assert sorted(t for (t,) in fetch(pg_url, "SELECT task FROM tasks")) == ["fedasync", "fedbuff"]
    for task, path in files.items():
        assert oct(path.stat().st_mode)[-3:] == "600"
        tokens = _tokens(path)
        assert [c for c, _ in tokens] == ["client-0", "client-1"]
        for client, token in tokens:
            assert fetch(pg_url, "SELECT client, task FROM tokens WHERE hash = %s", hash_token(token)) == [
                (client, task)
            ]
    # a second `up` on the same database resumes both tasks, with fresh tokens
    again = prepare(pg_url, _up_args(tmp_path, a, b))
    assert again == files and fetch(pg_url, "SELECT count(*) FROM tasks")[0][0] == 2
    assert fetch(pg_url, "SELECT count(*) FROM tokens")[0][0] == 8


def test_one_config_keeps_the_tokens_file_and_task_name(pg_url, tmp_path):
    files = prepare(pg_url, _up_args(tmp_path, _config(tmp_path, "a", FEDBUFF, 16), extra=("--task", "mine")))
    assert files == {"mine": tmp_path / "tokens.txt"} and len(_tokens(tmp_path / "tokens.txt")) == 2


def test_clashing_task_names_are_refused_before_anything_is_added(pg_url, tmp_path):
    a = _config(tmp_path, "a", FEDBUFF, 16)
    b = _config(tmp_path, "b", FEDBUFF, 32)
    with pytest.raises(ConfigError, match="two configs make task 'fedbuff'"):
        prepare(pg_url, _up_args(tmp_path, a, b))
    with pytest.raises(ConfigError, match="--task names a single task"):
        prepare(pg_url, _up_args(tmp_path, a, _config(tmp_path, "c", FEDASYNC, 16), extra=("--task", "x")))
    assert fetch(pg_url, "SELECT count(*) FROM tasks")[0][0] == 0
