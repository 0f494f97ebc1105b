"""A custom CNN on a torchvision-style image dataset held in memory: FedAvg vs FedBuff.

The dataset is scikit-learn's 8x8 digits wrapped as a torch Dataset of ([1, 8, 8] image,
label) pairs, as a torchvision dataset would give them; Dirichlet(0.5) labels over 50 clients.

    python examples/custom_cnn.py [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse

import torch
from sklearn.datasets import load_digits
from torch import nn

import asyncfl


class InMemoryImages(torch.utils.data.Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])


class Net(nn.Module):
    """Two convolutions with max pooling and a linear head, for [1, 8, 8] images."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 16, 3, padding=1)
        self.head = nn.Linear(16 * 2 * 2, num_classes)

    def forward(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.head(x.flatten(1))


def datasets(seed: int = 0) -> tuple[InMemoryImages, InMemoryImages]:
    bunch = load_digits()
    images = torch.tensor(bunch.images / 16.0, dtype=torch.float32).unsqueeze(1)
    labels = torch.tensor(bunch.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(order))
    return InMemoryImages(images[order[:cut]], labels[order[:cut]]), InMemoryImages(
        images[order[cut:]], labels[order[cut:]]
    )


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a short run (the test suite's)")
    ap.add_argument("--out", help="folder for the CLI's outputs (default: a temporary one)")
    args = ap.parse_args(argv)
    train, test = datasets()
    data = asyncfl.FederatedData.from_dataset(train, num_clients=50, test=test, partition="dirichlet", alpha=0.5)
    cfg = asyncfl.load_config(
        "quickstart",
        overrides={"population.devices": 50, "stop.max_time": 250 if args.quick else 800, "target_accuracy": 0.85},
    )
    torch.manual_seed(0)
    result = asyncfl.compare(cfg, model=Net(), data=data, runs=["fedavg", "fedbuff"], out=args.out)
    for run in result.summary["runs"]:
        print(f"{run['name']:>8}: final accuracy {run['final_accuracy']:.3f}, time to 0.85: {run['time_to_target']}")
    print(f"outputs in {result.out}")
    return result.summary


if __name__ == "__main__":
    main()
