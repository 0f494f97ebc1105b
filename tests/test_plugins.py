"""Plug-ins from configuration: model.factory and data.loader in YAML configs and the network
client's --data package.module:function, with errors that say what is wrong."""

import json

import pytest
import test_server_inputs
import yaml
from test_client_runtime import in_process_client

from asyncfl import cli, config
from asyncfl.build import build_data, build_flat_model
from asyncfl.client.runtime import ClientError, load_data
from asyncfl.data.user import FederatedData

PLUGGED = {
    "name": "plugged",
    "seed": 0,
    "target_accuracy": 0.5,
    "data": {"loader": "user_plugins:digit_images", "kwargs": {"clients": 20}},
    "model": {"factory": "user_plugins:image_cnn", "kwargs": {"width": 6}},
    "population": {"devices": 20, "dropout": 0.0},
    "trainer": {"lr": 0.1, "batch_size": 16, "local_steps": 5},
    "eval": {"every_seconds": 20},
    "stop": {"max_time": 200},
    "executor": "batched",
    "runs": [{"name": "fedbuff", "algorithm": {"name": "fedbuff", "buffer_size": 4}, "scheduler": {"concurrency": 8}}],
}


def plugged(**changes) -> config.ExperimentConfig:
    tree = json.loads(json.dumps(PLUGGED))
    for key, value in changes.items():
        section, field = key.split("__")
        tree[section][field] = value
    return config.validate(tree)


def test_yaml_config_with_plug_ins_runs_from_the_cli(tmp_path):
    path = tmp_path / "plugged.yaml"
    path.write_text(yaml.safe_dump(PLUGGED))
    assert cli.main(["simulate", "--config", str(path), "--out", str(tmp_path / "out"), "--threads", "1"]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["data"]["dataset"] == "user_plugins:digit_images" and summary["data"]["partition"] == "natural"
    assert summary["runs"][0]["final_accuracy"] > 0.5  # 10 classes: chance is 0.1


def test_factory_gets_kwargs_and_the_datas_classes():
    cfg = plugged()
    data = build_data(cfg)
    model = build_flat_model(cfg, data)
    assert model.module.module.conv.out_channels == 6 and model.module.module.fc.out_features == 10


def test_loader_returning_arrays_is_split_by_the_configured_partitioner():
    arrays = {"data__loader": "user_plugins:digit_arrays", "data__kwargs": {}}
    data = build_data(plugged(**arrays, data__partition={"kind": "iid"}))
    assert isinstance(data, FederatedData) and data.num_clients == 20 and data.example_shape == (1, 8, 8)
    with pytest.raises(config.ConfigError, match="set data.partition.kind"):
        build_data(plugged(**arrays))
    with pytest.raises(config.ConfigError, match=r"calling user_plugins:digit_arrays\(clients=20\) failed"):
        build_data(plugged(data__loader="user_plugins:digit_arrays"))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"model__factory": "no_such_package.models:net"}, "module 'no_such_package.models' not found"),
        ({"model__factory": "user_plugins:missing"}, "module 'user_plugins' has no 'missing'"),
        ({"model__factory": "user_plugins:not_a_model", "model__kwargs": {}}, "returned list, expected a torch.nn"),
        ({"model__factory": "user_plugins:seven_way", "model__kwargs": {}}, r"to \[2, 7\]; expected \[2, 10\]"),
        ({"data__loader": "user_plugins:a_string", "data__kwargs": {}}, "returned str; expected asyncfl.FederatedData"),
    ],
)
def test_plug_in_errors_name_the_problem(changes, message):
    cfg = plugged(**changes)
    with pytest.raises(config.ConfigError, match=message):
        build_flat_model(cfg, build_data(cfg))


def test_plug_in_fields_are_checked_by_the_schema():
    with pytest.raises(config.ConfigError, match="package.module:function|pattern"):
        plugged(model__factory="not a path")
    with pytest.raises(config.ConfigError, match="model.kwargs needs model.factory"):
        config.validate({**PLUGGED, "model": {"kwargs": {"width": 2}}})


def test_client_data_plug_in_keeps_the_example_shape():
    cfg = plugged()
    x, y = load_data("user_plugins:device_images", cfg, 64)
    assert x.shape == (40, 1, 8, 8) and y.shape == (40,)
    with pytest.raises(ClientError, match="the task has 60 features"):
        load_data("user_plugins:device_images", cfg, 60)
    with pytest.raises(ClientError, match="not found"):
        load_data("nowhere.at_all:data", cfg, 64)


def test_network_client_trains_the_plugged_model_on_its_own_data(tmp_path, monkeypatch):
    """The server builds the factory's model on the loader's data; a client with
    --data user_plugins:device_images builds the same one and its updates are accepted."""
    run = {"name": "task1", "algorithm": {"name": "fedbuff", "buffer_size": 3}, "scheduler": {"concurrency": 4}}
    served = config.validate({**PLUGGED, "runs": [run]})
    monkeypatch.setattr(test_server_inputs, "experiment", lambda algorithm, scheduler: served)
    with test_server_inputs.Harness(tmp_path) as h:
        rt = in_process_client(h, "a", max_trips=2, idle_wait=0.01)
        rt.data_spec = "user_plugins:device_images"
        assert rt.run()["accepted"] == 2
        assert rt.x.shape == (40, 64) and type(rt.model.module.module).__name__ == "ImageCnn"
