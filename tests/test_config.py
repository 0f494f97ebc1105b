import pytest

from asyncfl import config
from asyncfl.config import ConfigError


def base_tree():
    return config.preset_dict("quickstart")


def rejected(tree) -> str:
    with pytest.raises(ConfigError) as err:
        config.validate(tree)
    return str(err.value)


def test_quickstart_preset_is_valid_and_sets_modes():
    cfg = config.validate(base_tree())
    modes = {r.name: r.scheduler.mode for r in cfg.runs}
    assert modes == {"fedavg": "sync", "fedprox": "sync", "fedasync": "async", "fedbuff": "async"}


def test_negative_concurrency_names_the_field():
    tree = base_tree()
    tree["runs"][0]["scheduler"]["concurrency"] = -5
    msg = rejected(tree)
    assert "runs.0.scheduler.concurrency" in msg and "greater than 0" in msg


def test_unknown_algorithm_names_the_field():
    tree = base_tree()
    tree["runs"][1]["algorithm"]["name"] = "fedmagic"
    msg = rejected(tree)
    assert "runs.1.algorithm" in msg and "fedmagic" in msg


@pytest.mark.parametrize("alpha", [0, -0.1, 1.5])
def test_fedasync_alpha_outside_unit_interval(alpha):
    tree = base_tree()
    tree["runs"][2]["algorithm"]["alpha"] = alpha
    assert "runs.2.algorithm.fedasync.alpha" in rejected(tree)


def test_dirichlet_alpha_must_be_positive():
    tree = base_tree()
    tree["data"]["partition"]["alpha"] = 0
    assert "data.partition.alpha" in rejected(tree)


def test_unknown_field_is_rejected():
    tree = base_tree()
    tree["trainer"]["learning_rate"] = 0.1
    assert "trainer.learning_rate" in rejected(tree)


def test_invalid_mode_for_algorithm():
    tree = base_tree()
    tree["runs"][2]["scheduler"]["mode"] = "sync"
    assert "not valid for fedasync" in rejected(tree)


def test_partial_straggler_needs_timeout():
    tree = base_tree()
    tree["runs"][1]["scheduler"].pop("round_timeout")
    assert "needs a round_timeout" in rejected(tree)


def test_overrides_by_run_name_and_index():
    cfg = config.load(
        preset="quickstart",
        overrides=["runs.fedbuff.algorithm.buffer_size=5", "runs.0.scheduler.concurrency=7", "population.devices=50"],
        seed=9,
    )
    assert cfg.run("fedbuff").algorithm.buffer_size == 5
    assert cfg.runs[0].scheduler.concurrency == 7
    assert cfg.population.devices == 50 and cfg.seed == 9


def test_bad_override_and_unknown_preset():
    with pytest.raises(ConfigError, match="key=value"):
        config.load(preset="quickstart", overrides=["seed"])
    with pytest.raises(ConfigError, match="no list entry"):
        config.load(preset="quickstart", overrides=["runs.nosuch.algorithm.alpha=1"])
    with pytest.raises(ConfigError, match="unknown preset"):
        config.load(preset="nosuch")


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(path=tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("runs: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(path=bad)


@pytest.mark.parametrize(
    "sets, message",
    [
        (["runs.0.algorithm.name=perfedavg", "runs.0.scheduler.mode=async"], "not valid for perfedavg"),
        (["runs.1.algorithm={name: qfedavg}", "runs.1.scheduler.mode=async"], "needs algorithm.buffer_size"),
        (["runs.0.algorithm.aggregation=average"], "aggregation"),
        (["runs.0.algorithm.trim_fraction=0.5"], "trim_fraction"),
        (["data.partition.kind=natural"], "partition 'natural' needs a dataset with users"),
        (["data.dataset=synthetic", "data.partition.kind=iid"], "its partition is 'natural'"),
        (["data.dataset=cifar10"], "set data.path"),
        (["population.attack.fraction=1.5"], "population.attack.fraction"),
    ],
)
def test_invalid_zoo_combinations_are_config_errors(small, sets, message):
    with pytest.raises(ConfigError, match=message):
        small(sets=sets)


def test_missing_dataset_files_and_wrong_model_are_config_errors(small, tmp_path):
    from asyncfl.build import build_data, build_flat_model

    cfg = small(sets=["data.dataset=fashion_mnist", f"data.path={tmp_path}"])
    with pytest.raises(ConfigError, match="dataset-fashion-mnist"):
        build_data(cfg)
    cfg = small(sets=["model.name=char_gru"])
    with pytest.raises(ConfigError, match="char_gru reads token ids"):
        build_flat_model(cfg, build_data(cfg))
