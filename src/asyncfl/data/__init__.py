"""Federated datasets: a train pool split into per-client index lists, and a test split."""

from asyncfl.data.federated import FederatedDataset
from asyncfl.data.partition import partition

__all__ = ["FederatedDataset", "partition"]
