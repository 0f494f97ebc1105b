"""The algorithm registry: each algorithm's definition is what config, builders, server and
client read, so these tests check the definitions against what each part builds."""

import dataclasses
import typing

import pytest

from asyncfl import config
from asyncfl.algorithms import aggregators
from asyncfl.algorithms.defs import registry
from asyncfl.algorithms.defs.registry import ClientOptions, definition, definitions
from asyncfl.algorithms.fednova import FedNova
from asyncfl.algorithms.private import PrivateAggregator
from asyncfl.algorithms.scaffold import ScaffoldAggregator
from asyncfl.build import build_aggregator, build_trainer, client_options
from asyncfl.models import FlatModel, build_model

NAMES = ["fedavg", "fedprox", "perfedavg", "qfedavg", "fedasync", "fedbuff", "fednova", "scaffold"]


def run(algorithm: dict, scheduler: dict | None = None, **extra) -> config.RunSpec:
    return config.RunSpec.model_validate({"name": "r", "algorithm": algorithm, "scheduler": scheduler or {}, **extra})


def config_error(algorithm) -> str:
    with pytest.raises(config.ConfigError) as err:
        config.validate({"runs": [{"name": "r", "algorithm": algorithm}]})
    return str(err.value)


def test_every_algorithm_is_registered_and_the_algorithm_section_is_their_union():
    assert list(definitions()) == NAMES
    union, _ = typing.get_args(config.AlgorithmConfig)
    assert list(typing.get_args(union)) == [definition(n).config for n in NAMES]


def test_unknown_algorithm_is_a_config_error_listing_the_valid_names():
    valid = "valid: fedasync, fedavg, fedbuff, fednova, fedprox, perfedavg, qfedavg, scaffold"
    assert f"runs.0.algorithm: unknown algorithm 'foo'; {valid}" in config_error({"name": "foo"})
    assert f"runs.0.algorithm: name the algorithm (algorithm.name); {valid}" in config_error({"mu": 0.1})
    assert f"unknown algorithm ['fedavg']; {valid}" in config_error({"name": ["fedavg"]})
    with pytest.raises(ValueError, match=f"unknown algorithm 'foo'; {valid}"):
        definition("foo")


@pytest.mark.parametrize("name", NAMES)
def test_the_first_mode_is_the_default_and_others_are_refused(name):
    a = {"name": name, "buffer_size": 2} if name == "qfedavg" else {"name": name}
    modes = definition(name).modes
    assert run(a).scheduler.mode == modes[0]
    for other in {"sync", "async"} - set(modes):
        with pytest.raises(ValueError, match=f"scheduler.mode '{other}' is not valid for {name}"):
            run(a, {"mode": other})


def test_declared_capabilities():
    private = {n for n in NAMES if definition(n).private}
    assert private == {"fedavg", "fedprox", "perfedavg", "fedbuff"}
    assert {n for n in NAMES if definition(n).secure_aggregation} == {
        "fedavg",
        "fedprox",
        "perfedavg",
        "fedbuff",
        "fednova",
        "scaffold",
    }
    for n in NAMES:
        d = definition(n)
        if n == "scaffold":  # per-client control variates, uploaded changes of them, no lossy codecs
            assert not d.compression and d.client_state == "control" and d.upload_fields == ("control_delta",)
            assert d.client_rule is not None and d.sized_by_users
        else:
            assert d.compression and d.client_state is None and d.upload_fields == () and d.client_rule is None


@pytest.mark.parametrize(
    "algorithm, options",
    [
        ({"name": "fedavg"}, ClientOptions()),
        ({"name": "fedprox", "mu": 0.3}, ClientOptions(prox_mu=0.3)),
        ({"name": "fedasync", "rho": 0.2}, ClientOptions(prox_mu=0.2)),
        (
            {"name": "perfedavg", "variant": "hf", "meta_lr": 0.05, "meta_delta": 0.002},
            ClientOptions(meta="hf", meta_lr=0.05, meta_delta=0.002),
        ),
        ({"name": "qfedavg"}, ClientOptions(start_loss="full")),
        ({"name": "qfedavg", "loss_estimate": "first_batch"}, ClientOptions()),
        ({"name": "fedbuff"}, ClientOptions()),
        ({"name": "fednova", "mu": 0.4}, ClientOptions(prox_mu=0.4)),
        ({"name": "scaffold"}, ClientOptions()),
    ],
)
def test_client_options_reach_the_local_trainer(algorithm, options):
    spec = run(algorithm)
    assert client_options(spec) == options
    cfg = config.validate({"runs": [spec.model_dump(mode="json")]})
    t = build_trainer(cfg, cfg.runs[0], FlatModel(build_model("logreg", 4, 3)))
    assert (t.step.prox_mu, t.step.meta, t.step.meta_lr, t.step.meta_delta, t.start_loss) == (
        options.prox_mu,
        options.meta,
        options.meta_lr,
        options.meta_delta,
        options.start_loss,
    )


@pytest.mark.parametrize(
    "algorithm, kind",
    [
        ({"name": "fedavg"}, aggregators.BufferedAggregator),
        ({"name": "fedprox", "aggregation": "median"}, aggregators.RobustAggregator),
        ({"name": "qfedavg"}, aggregators.QFedAvg),
        ({"name": "fedasync"}, aggregators.FedAsync),
        ({"name": "fedbuff", "buffer_size": 4}, aggregators.BufferedAggregator),
        ({"name": "fednova", "buffer_size": 4}, FedNova),
        ({"name": "scaffold", "num_clients": 5}, ScaffoldAggregator),
    ],
)
def test_each_definition_builds_its_aggregator(algorithm, kind):
    agg = build_aggregator(run(algorithm), trainer_lr=0.1)
    assert type(agg) is kind
    if algorithm["name"] == "fedbuff":
        assert agg.buffer_size == 4 and agg.normalize == "count"
    if algorithm["name"] == "qfedavg":
        assert agg.lipschitz == pytest.approx(10.0)
    if algorithm["name"] == "fednova":
        assert agg.buffer_size == 4 and agg.lr == 0.1


@pytest.mark.parametrize(
    "algorithm, scheduler, denominator, buffer_size",
    [
        ({"name": "fedavg"}, {"concurrency": 7}, 7, None),
        ({"name": "fedprox"}, {"concurrency": 5}, 5, None),
        ({"name": "fedbuff", "buffer_size": 3}, {"concurrency": 9}, 3, 3),
    ],
)
def test_private_aggregators_divide_by_the_expected_updates_per_step(algorithm, scheduler, denominator, buffer_size):
    spec = run(algorithm, scheduler, privacy={"clip_norm": 1.0, "noise_multiplier": 1.0})
    assert config.privacy_denominator(spec) == denominator
    agg = build_aggregator(spec, 0.1, num_users=100)
    assert isinstance(agg, PrivateAggregator)
    assert agg.denominator == denominator and agg.buffer_size == buffer_size


@pytest.mark.parametrize(
    "algorithm, message",
    [
        (
            {"name": "fedasync"},
            "privacy is not supported for algorithm 'fedasync' (its aggregate's sensitivity is not "
            "bounded by clip_norm); use one of fedavg, fedprox, perfedavg, fedbuff",
        ),
        ({"name": "fedbuff", "example_weight": "n"}, "algorithm.example_weight 'n' is not covered by privacy"),
        ({"name": "fedbuff", "normalize": "weight"}, "algorithm.normalize 'weight' is not covered by privacy"),
        ({"name": "fedavg", "aggregation": "median"}, "algorithm.aggregation 'median' is not covered by privacy"),
    ],
)
def test_privacy_restrictions_come_from_the_definitions(algorithm, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        run(algorithm, privacy={"clip_norm": 1.0, "noise_multiplier": 1.0})


def test_qfedavg_async_needs_a_buffer_size():
    with pytest.raises(ValueError, match="qfedavg in async mode needs algorithm.buffer_size"):
        run({"name": "qfedavg"}, {"mode": "async"})
    assert run({"name": "qfedavg", "buffer_size": 3}, {"mode": "async"}).scheduler.mode == "async"


def test_config_reads_the_compression_capability(monkeypatch):
    with_codec = {"compression": {"upload": "int8"}}
    assert run({"name": "fedavg"}, **with_codec).compression.upload == "int8"
    monkeypatch.setitem(registry._REGISTRY, "fedavg", dataclasses.replace(definition("fedavg"), compression=False))
    with pytest.raises(ValueError, match="compression is not supported for algorithm 'fedavg'"):
        run({"name": "fedavg"}, **with_codec)
    assert run({"name": "fedavg"}).compression is None
