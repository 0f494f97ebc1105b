"""Data from the tools FL users already have, fed to asyncfl.FederatedData: a Hugging Face
`datasets` dataset saved to and read back from a local folder (no download), and Flower Datasets
partitioners over it. They come with the `interop` extra (`make test` installs it); without it
these tests skip."""

import os

import numpy as np
import pytest
from sklearn.datasets import load_digits
from torch import nn

import asyncfl

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here downloads; an attempt fails instead of waiting
datasets = pytest.importorskip("datasets")
partitioner = pytest.importorskip("flwr_datasets.partitioner")

SHORT = {"stop.max_time": 150, "eval.every_seconds": 30}
KEYS = ("image", "label")


@pytest.fixture(scope="module")
def digits_on_disk(tmp_path_factory):
    """The bundled digits as a Hugging Face dataset of 8-bit PIL images, saved and loaded back
    as a user's local dataset would be: (train, test, the train split's raw pixels and labels)."""
    digits = load_digits()
    pixels = (digits.images * 15).astype(np.uint8)  # 0..16 -> 0..240, as an 8-bit image
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})
    full = datasets.Dataset.from_dict({"image": list(pixels), "label": digits.target.tolist()}, features=features)
    folder = tmp_path_factory.mktemp("hf") / "digits"
    full.train_test_split(test_size=0.2, seed=0).save_to_disk(str(folder))
    split = datasets.load_from_disk(str(folder))
    train = split["train"]
    raw = np.stack([np.asarray(train[i]["image"]) for i in range(len(train))])
    return train, split["test"], raw, np.asarray(train["label"])


def mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))


def test_a_local_hugging_face_dataset_feeds_from_dataset(digits_on_disk):
    train, test, raw, labels = digits_on_disk
    data = asyncfl.FederatedData.from_dataset(train, 20, test=test, partition="dirichlet", alpha=0.5, keys=KEYS)
    assert data.num_clients == 20 and data.num_classes == 10 and data.example_shape == (8, 8)
    assert len(data.y) == len(train) and len(data.y_test) == len(test)
    assert np.array_equal(data.y.numpy(), labels)
    # PIL images (uint8) become floats in [0, 1], pixel for pixel
    assert np.allclose(data.x.numpy(), raw.reshape(len(raw), -1) / 255.0)
    result = asyncfl.simulate(asyncfl.load_config("quickstart", overrides=SHORT), model=mlp(), data=data, run="fedbuff")
    assert result.summary["data"]["dataset"] == "custom" and result.summary["data"]["partition"] == "dirichlet"
    assert result.summary["runs"][0]["final_accuracy"] > 0.5  # 10 classes: chance is 0.1


@pytest.mark.parametrize(
    "make",
    [
        lambda: partitioner.IidPartitioner(num_partitions=12),
        lambda: partitioner.DirichletPartitioner(
            num_partitions=12, partition_by="label", alpha=0.3, min_partition_size=5, seed=0
        ),
    ],
    ids=["iid", "dirichlet"],
)
def test_flower_datasets_partitions_become_clients(digits_on_disk, make):
    train, test, raw, labels = digits_on_disk
    split = make()
    split.dataset = train
    parts = [split.load_partition(k) for k in range(split.num_partitions)]
    data = asyncfl.FederatedData.from_clients(parts, test=test, keys=KEYS)
    assert data.num_clients == 12
    assert data.client_sizes().tolist() == [len(p) for p in parts]
    assert sum(len(p) for p in parts) == len(train)  # every example in exactly one partition
    for k in (0, 11):  # a client holds its partition's examples, in order
        x, y = data.client_data(k)
        assert y.tolist() == parts[k]["label"]
        assert np.allclose(x.numpy(), np.stack([np.asarray(im) for im in parts[k]["image"]]).reshape(len(y), -1) / 255)
    result = asyncfl.compare(
        asyncfl.load_config("quickstart", overrides=SHORT), model=mlp(), data=data, runs=["fedavg", "fedbuff"]
    )
    assert [r["name"] for r in result.summary["runs"]] == ["fedavg", "fedbuff"]
    assert all(r["final_accuracy"] > 0.5 for r in result.summary["runs"])
