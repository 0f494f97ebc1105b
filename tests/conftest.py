import pytest

from asyncfl import config


def small_config(**overrides) -> config.ExperimentConfig:
    """A quick digits experiment: 40 devices, a few hundred virtual seconds."""
    tree = {
        "name": "small",
        "seed": 1,
        "target_accuracy": 0.8,
        "population": {"devices": 40, "dropout": 0.0},
        "model": {"name": "mlp", "hidden": [32]},
        "trainer": {"lr": 0.1, "batch_size": 16, "local_steps": 5},
        "eval": {"every_seconds": 10},
        "stop": {"max_time": 200},
        "runs": [
            {
                "name": "fedavg",
                "algorithm": {"name": "fedavg"},
                "scheduler": {"concurrency": 8, "over_selection": 0.25},
            },
            {"name": "fedbuff", "algorithm": {"name": "fedbuff", "buffer_size": 4}, "scheduler": {"concurrency": 8}},
        ],
    }
    for assignment in overrides.pop("sets", []):
        config.apply_override(tree, assignment)
    tree.update(overrides)
    return config.validate(tree)


def digits_clients(num_clients: int):
    """Digits split over `num_clients` by Dirichlet(0.5) labels: the executors' tests' data."""
    from asyncfl.data import digits
    from asyncfl.data.federated import FederatedDataset
    from asyncfl.data.partition import partition

    x, y, xt, yt, c = digits.load(0.2, 0)
    parts = partition("dirichlet", y.numpy(), num_clients, 0, alpha=0.5, classes_per_client=2, exponent=1.0)
    return FederatedDataset(x, y, parts, xt, yt, c)


@pytest.fixture
def torch_threads():
    """`torch_threads(n)` sets torch's intra-op threads for one test; the count is restored after."""
    import torch

    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.fixture
def small():
    return small_config


def pytest_configure(config):
    # one intra-op thread: on a shared 2-core machine, OpenMP threads waiting for each other
    # on small ops slow runs down by an order of magnitude
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def postgres():
    """One throwaway PostgreSQL cluster (`LocalPostgres`) for the whole session, removed at its end.
    Skipped only where the server binaries are missing: `make test` installs them."""
    from asyncfl.cluster.postgres import LocalPostgres, PostgresNotInstalled

    try:
        cluster = LocalPostgres()
    except PostgresNotInstalled as err:
        pytest.skip(str(err))
    with cluster:
        yield cluster


@pytest.fixture(scope="session")
def _migrated_template(postgres) -> str:
    """A migrated database that each test's database is copied from (faster than migrating each)."""
    from asyncfl.cluster.db import migrate

    name = "asyncfl_migrated_template"
    migrate(postgres.create_database(name))
    return name


@pytest.fixture
def pg_url(postgres, _migrated_template) -> str:
    """The URL of a fresh, migrated database of its own for one test; dropped after it."""
    import uuid

    postgres.start()  # a no-op unless an earlier test left the server stopped
    name = f"test_{uuid.uuid4().hex[:16]}"
    url = postgres.create_database(name, template=_migrated_template)
    yield url
    postgres.start()
    postgres.drop_database(name)
