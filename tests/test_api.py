"""The Python API: user data and modules in, the CLI's results out as Python objects."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import asyncfl
from asyncfl import config
from asyncfl.data import digits
from asyncfl.experiment import run_experiment

SHORT = {"stop.max_time": 60, "eval.every_seconds": 20}


def digits_images(seed=0):
    """The bundled digits as [N, 1, 8, 8] images, 30 clients by example index."""
    x, y, x_test, y_test, _ = digits.load(0.2, seed)
    return x.view(-1, 1, 8, 8), y, x_test.view(-1, 1, 8, 8), y_test


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 4 * 4, 10)

    def forward(self, x):
        assert x.shape[1:] == (1, 8, 8)  # the module sees its own example shape
        return self.fc(nn.functional.max_pool2d(torch.relu(self.conv(x)), 2).flatten(1))


def test_from_arrays_groups_examples_by_client_id():
    x = torch.arange(12.0).view(6, 2)
    y = torch.tensor([0, 1, 0, 1, 2, 2])
    data = asyncfl.FederatedData.from_arrays(x, y, ["b", "a", "b", "c", "a", "b"], test=(x[:2], y[:2]))
    assert data.client_names == ["a", "b", "c"]
    assert [c.tolist() for c in data.client_indices] == [[1, 4], [0, 2, 5], [3]]
    assert data.num_classes == 3 and data.num_features == 2 and data.example_shape is None
    xa, ya = data.client_data(0)
    assert xa.tolist() == [[2.0, 3.0], [8.0, 9.0]] and ya.tolist() == [1, 2]


def test_from_dataset_and_from_clients_keep_example_shapes():
    x, y, x_test, y_test = digits_images()
    ds = torch.utils.data.TensorDataset(x[:100], y[:100])
    data = asyncfl.FederatedData.from_dataset(ds, 4, test=(x_test, y_test), partition="iid")
    assert data.example_shape == (1, 8, 8) and data.x.shape == (100, 64)
    assert sorted(np.concatenate(data.client_indices).tolist()) == list(range(100))
    given = asyncfl.FederatedData.from_dataset((x[:10], y[:10]), 2, test=(x_test, y_test), partition=[[0, 1], [5]])
    assert [c.tolist() for c in given.client_indices] == [[0, 1], [5]] and given.partition_kind == "given"
    per = asyncfl.FederatedData.from_clients([(x[:3], y[:3]), ds], test=(x_test, y_test))
    assert per.client_sizes().tolist() == [3, 100]
    assert torch.equal(per.client_data(1)[0], x[:100].view(100, -1))
    with pytest.raises(ValueError, match="same number"):
        asyncfl.FederatedData.from_arrays(x[:5], y[:4], [0] * 4, test=(x_test, y_test))
    with pytest.raises(ValueError, match="non-empty"):
        asyncfl.FederatedData.from_dataset(ds, 2, test=(x_test, y_test), partition=[[0], []])


def test_dict_items_and_8_bit_images_as_from_hugging_face_or_pil():
    """Datasets whose items are dicts (Hugging Face columns, Flower Datasets partitions) are read
    at `keys`; uint8 pixels become floats in [0, 1]."""
    pixels = np.array([[[0, 255], [51, 102]], [[255, 255], [0, 0]], [[1, 2], [3, 4]]], dtype=np.uint8)
    rows = [{"image": pixels[i], "label": i % 2, "id": i} for i in range(3)]
    data = asyncfl.FederatedData.from_dataset(rows, 3, test=rows, partition="iid", keys=("image", "label"))
    assert data.example_shape == (2, 2) and data.x.dtype == torch.float32
    assert data.x[np.flatnonzero(data.y.numpy() == 1)[0]].tolist() == [1.0, 1.0, 0.0, 0.0]
    per = asyncfl.FederatedData.from_clients([rows[:2], rows[2:]], test=rows, keys=("image", "label"))
    assert per.client_sizes().tolist() == [2, 1] and torch.allclose(per.x_test[0], torch.tensor([0.0, 1.0, 0.2, 0.4]))
    with pytest.raises(ValueError, match=r"dicts with keys \['img', 'label'\]"):
        asyncfl.FederatedData.from_dataset(rows, 3, test=rows, keys=("img", "label"))


def test_load_config_applies_overrides_by_run_name():
    cfg = asyncfl.load_config("quickstart", overrides={"runs.fedbuff.algorithm.buffer_size": 20, "seed": 3})
    assert cfg.run("fedbuff").algorithm.buffer_size == 20 and cfg.seed == 3


def test_api_without_model_or_data_equals_the_cli(tmp_path):
    cfg = asyncfl.load_config("quickstart", overrides=SHORT)
    cli = run_experiment(
        config.load(preset="quickstart", overrides=[f"{k}={v}" for k, v in SHORT.items()]),
        tmp_path / "cli",
        runs=["fedbuff"],
        threads=1,
    )
    result = asyncfl.simulate(cfg, run="fedbuff", out=tmp_path / "api")
    strip = ("wall_seconds", "peak_rss_mb")  # measured, not computed
    for a, b in zip(cli["runs"], result.summary["runs"]):
        assert {k: v for k, v in a.items() if k not in strip} == {k: v for k, v in b.items() if k not in strip}
    assert json.loads((tmp_path / "api" / "summary.json").read_text())["runs"][0]["name"] == "fedbuff"
    assert (tmp_path / "api" / "fedbuff" / "metrics.csv").is_file()


def test_custom_cnn_on_images_in_memory(tmp_path):
    x, y, x_test, y_test = digits_images()
    data = asyncfl.FederatedData.from_arrays(x, y, np.arange(len(y)) % 30, test=(x_test, y_test))
    cfg = asyncfl.load_config("quickstart", overrides={**SHORT, "stop.max_time": 200})
    torch.manual_seed(0)
    result = asyncfl.compare(cfg, model=TinyCNN(), data=data, runs=["fedavg", "fedbuff"], out=tmp_path)
    assert [r["name"] for r in result.summary["runs"]] == ["fedavg", "fedbuff"]
    assert result.summary["model"] == "TinyCNN" and result.summary["data"]["dataset"] == "custom"
    assert result.summary["data"]["partition"] == "natural"
    assert all(r["final_accuracy"] > 0.5 for r in result.summary["runs"])  # 10 classes: chance is 0.1
    rows = result.metrics
    rows = rows.to_dict("records") if hasattr(rows, "to_dict") else rows
    assert {r["run"] for r in rows} == {"fedavg", "fedbuff"}
    assert rows[-1]["test_accuracy"] == result.summary["runs"][-1]["final_accuracy"]
    paths = result.plot(tmp_path / "again")
    assert [p.name for p in paths] == ["accuracy_vs_time.png", "accuracy_vs_trips.png", "staleness.png"]
    assert all(p.stat().st_size > 0 for p in paths)
    assert json.loads((tmp_path / "summary.json").read_text()) == result.summary


def test_a_fallback_notice_names_the_users_module_not_its_wrapper(capsys):
    x, y, x_test, y_test = digits_images()
    data = asyncfl.FederatedData.from_arrays(x[:60], y[:60], np.arange(60) % 3, test=(x_test, y_test))
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Dropout(0.2), nn.Linear(16, 10))
    asyncfl.simulate(asyncfl.load_config("quickstart", overrides={**SHORT, "stop.max_time": 20}), model=net, data=data)
    err = capsys.readouterr().err
    assert "batched executor unavailable for Sequential (module.2 (Dropout) draws random masks" in err


def test_modules_that_do_not_fit_are_named():
    x, y, x_test, y_test = digits_images()
    data = asyncfl.FederatedData.from_arrays(x[:60], y[:60], np.arange(60) % 3, test=(x_test, y_test))
    cfg = asyncfl.load_config("quickstart", overrides=SHORT)
    with pytest.raises(
        config.ConfigError, match=r"maps 2 examples of shape \[1, 8, 8\] to \[2, 7\]; expected \[2, 10\]"
    ):
        asyncfl.simulate(cfg, model=nn.Sequential(nn.Flatten(), nn.Linear(64, 7)), data=data)
    with pytest.raises(config.ConfigError, match="fails on the data's examples"):
        asyncfl.simulate(cfg, model=nn.Sequential(nn.Flatten(), nn.Linear(50, 10)), data=data)
    with pytest.raises(config.ConfigError, match="track_running_stats=False"):
        asyncfl.simulate(cfg, model=nn.Sequential(nn.Flatten(), nn.BatchNorm1d(64), nn.Linear(64, 10)), data=data)


def test_import_asyncfl_loads_neither_torch_nor_the_simulator():
    code = "import sys, asyncfl; print(sorted(m for m in ('torch', 'asyncfl.sim', 'asyncfl.api') if m in sys.modules))"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]"


def test_read_only_arrays_are_copied_writable_ones_shared():
    """PIL images and Hugging Face datasets give read-only arrays, which torch cannot share."""
    x = np.arange(8, dtype=np.float32).reshape(4, 2)
    y = np.array([0, 1, 0, 1])
    shared = asyncfl.FederatedData.from_arrays(x, y, [0, 0, 1, 1], test=(x, y))
    assert np.shares_memory(shared.x.numpy(), x)
    x.flags.writeable = False
    copied = asyncfl.FederatedData.from_arrays(x, y, [0, 0, 1, 1], test=(x, y))
    assert not np.shares_memory(copied.x.numpy(), x) and torch.equal(copied.x, shared.x)


def test_a_dataset_of_pil_images_as_torchvision_folders_give():
    """torchvision's ImageFolder / MNIST without a transform yield (PIL image, label) pairs."""
    from PIL import Image

    gray = np.array([[0, 255], [51, 102]], dtype=np.uint8)
    rgb = np.stack([gray, 255 - gray, np.zeros_like(gray)], axis=-1)
    for pixels, shape in ((gray, (2, 2)), (rgb, (2, 2, 3))):
        items = [(Image.fromarray(pixels), label) for label in (0, 1, 1)]
        data = asyncfl.FederatedData.from_dataset(items, 1, test=items)
        assert data.example_shape == shape and data.y.tolist() == [0, 1, 1]
        assert torch.allclose(data.x[0], torch.as_tensor(pixels.reshape(-1) / 255, dtype=torch.float32))
