"""LEAF benchmark data (FEMNIST, Shakespeare, Sent140) from LEAF's JSON files on a local path.

Layout: `path/train/*.json` and `path/test/*.json` (or the same under `path/data/`), each file
`{"users": [...], "num_samples": [...], "user_data": {user: {"x": [...], "y": [...]}}}`.

Natural partition: one client per user with training examples, in file-name then file order.
All examples live in one pool: every client's training examples (contiguous, client by client),
then every test example. `client_test_indices[k]` are user k's test examples in that pool;
`x_test` / `y_test` (a view of the pool's tail) are all test examples, including those of users
without training data (LEAF's user split), who are not clients.

Per task:
- femnist: x = 784 floats (28x28, as stored), y in 0..61; float32 features, 62 classes.
- shakespeare: x = 80-character string, y = the next character; both encoded with
  `asyncfl.data.shakespeare.VOCAB` (unknown characters -> id 0); x int64 [N, 80], 97 classes.
- sent140: x = a tweet record whose text is at index 4, y in {0, 1}. Text is lower-cased and
  split into tokens `[a-z0-9']+`; the vocabulary is the `vocab_size` most frequent training
  tokens (ties alphabetical). `sent140_repr="tokens"`: x int64 [N, max_len] of ids (0 = padding,
  1 = unknown, 2.. = vocabulary), truncated / right-padded to `max_len`; `"bow"`: x float32
  [N, vocab_size] of token counts over the whole tweet (unknown tokens dropped). 2 classes.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from asyncfl.data import shakespeare as chars
from asyncfl.data.federated import FederatedDataset

TASKS = ("femnist", "shakespeare", "sent140")
_TOKEN = re.compile(r"[a-z0-9']+")


def _split_dir(root: Path, split: str) -> Path:
    for base in (root, root / "data"):
        if (base / split).is_dir():
            return base / split
    raise FileNotFoundError(f"LEAF: no {split}/ folder in {root} (expected {root}/{split}/*.json)")


def read_split(directory: Path) -> list[tuple[str, list, list, Path]]:
    """(user, xs, ys, file) for every user of every JSON file in `directory`, validated."""
    files = sorted(directory.glob("*.json"))
    if not files:
        raise FileNotFoundError(f"LEAF: no *.json files in {directory}")
    out, seen = [], {}
    for f in files:
        try:
            blob = json.loads(f.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{f}: malformed JSON ({err})") from None
        if not isinstance(blob, dict) or not {"users", "num_samples", "user_data"} <= blob.keys():
            raise ValueError(f"{f}: expected an object with 'users', 'num_samples' and 'user_data'")
        users, counts, data = blob["users"], blob["num_samples"], blob["user_data"]
        if not isinstance(users, list) or not isinstance(counts, list) or not isinstance(data, dict):
            raise ValueError(f"{f}: 'users' and 'num_samples' must be lists and 'user_data' an object")
        if len(users) != len(counts):
            raise ValueError(f"{f}: {len(users)} users but {len(counts)} num_samples entries")
        for user, n in zip(users, counts):
            user = str(user)
            if user in seen:
                raise ValueError(f"{f}: user {user!r} also appears in {seen[user]}")
            seen[user] = f
            record = data.get(user)
            if not isinstance(record, dict) or "x" not in record or "y" not in record:
                raise ValueError(f"{f}: user {user!r} has no user_data entry with 'x' and 'y'")
            xs, ys = record["x"], record["y"]
            if not isinstance(xs, list) or not isinstance(ys, list) or len(xs) != len(ys):
                raise ValueError(f"{f}: user {user!r}: x and y must be lists of equal length")
            if not isinstance(n, int) or len(xs) != n:
                raise ValueError(f"{f}: user {user!r}: num_samples says {n} but user_data has {len(xs)}")
            out.append((user, xs, ys, f))
    return out


def _femnist(xs: list, ys: list, where: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        x = np.asarray(xs, dtype=np.float32).reshape(len(xs), -1) if xs else np.zeros((0, 784), np.float32)
        y = np.asarray(ys, dtype=np.int64)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{where}: femnist x must be lists of 784 numbers and y integers ({err})") from None
    if x.shape[1] != 784:
        raise ValueError(f"{where}: femnist images need 784 values, found {x.shape[1]}")
    if len(y) and (y.min() < 0 or y.max() > 61):
        raise ValueError(f"{where}: femnist labels must lie in 0..61, found {y.min()}..{y.max()}")
    return x, y


def _shakespeare(xs: list, ys: list, where: str) -> tuple[np.ndarray, np.ndarray]:
    if not all(isinstance(s, str) and len(s) == chars.SEQ_LEN for s in xs):
        raise ValueError(f"{where}: shakespeare x must be {chars.SEQ_LEN}-character strings")
    if not all(isinstance(c, str) and len(c) == 1 for c in ys):
        raise ValueError(f"{where}: shakespeare y must be single characters")
    x = chars.encode("".join(xs)).reshape(len(xs), chars.SEQ_LEN)
    return x, chars.encode("".join(ys))


def _tweet_tokens(xs: list, ys: list, where: str) -> tuple[list[list[str]], np.ndarray]:
    tokens = []
    for rec in xs:
        if not isinstance(rec, list) or len(rec) < 5 or not isinstance(rec[4], str):
            raise ValueError(f"{where}: sent140 x must be tweet records with the text at index 4, got {rec!r:.80}")
        tokens.append(_TOKEN.findall(rec[4].lower()))
    try:
        y = np.asarray([int(float(v)) for v in ys], dtype=np.int64)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{where}: sent140 y must be 0 or 1 ({err})") from None
    if len(y) and not np.isin(y, (0, 1)).all():
        raise ValueError(f"{where}: sent140 y must be 0 or 1, found {sorted(set(y.tolist()))}")
    return tokens, y


def _encode_tweets(
    tokens: list[list[str]], vocab: dict[str, int], repr_: str, max_len: int, vocab_size: int
) -> np.ndarray:
    if repr_ == "tokens":
        x = np.zeros((len(tokens), max_len), dtype=np.int64)
        for i, toks in enumerate(tokens):
            ids = [vocab.get(t, 1) for t in toks[:max_len]]
            x[i, : len(ids)] = ids
        return x
    x = np.zeros((len(tokens), vocab_size), dtype=np.float32)
    for i, toks in enumerate(tokens):
        for t in toks:
            j = vocab.get(t)
            if j is not None:
                x[i, j - 2] += 1.0
    return x


def load_leaf(
    path: str | Path,
    task: Literal["femnist", "shakespeare", "sent140"],
    *,
    max_users: int | None = None,
    sent140_repr: Literal["tokens", "bow"] = "tokens",
    max_len: int = 25,
    vocab_size: int = 10_000,
) -> FederatedDataset:
    """One LEAF task as a FederatedDataset (clients = users; `client_names` = user ids).

    `max_users` keeps the first users (file order) as clients; the test set keeps every user.
    """
    if task not in TASKS:
        raise ValueError(f"LEAF: unknown task {task!r}; known: {', '.join(TASKS)}")
    if sent140_repr not in ("tokens", "bow"):
        raise ValueError(f"LEAF sent140_repr must be 'tokens' or 'bow', got {sent140_repr!r}")
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"LEAF {task}: path not found: {root} (set data.path to LEAF's data folder)")
    train_dir, test_dir = _split_dir(root, "train"), _split_dir(root, "test")
    train, test = read_split(train_dir), read_split(test_dir)
    train = [u for u in train if u[1]]
    if max_users is not None:
        train = train[:max_users]
    if not train:
        raise ValueError(f"LEAF {task}: no user with training examples under {root}")

    def convert(split):
        if task == "femnist":
            return [_femnist(xs, ys, f"{f} user {u!r}") for u, xs, ys, f in split]
        if task == "shakespeare":
            return [_shakespeare(xs, ys, f"{f} user {u!r}") for u, xs, ys, f in split]
        return [_tweet_tokens(xs, ys, f"{f} user {u!r}") for u, xs, ys, f in split]

    tr, te = convert(train), convert(test)
    num_classes = {"femnist": 62, "shakespeare": chars.NUM_CHARS, "sent140": 2}[task]
    if task == "sent140":
        counts = Counter(t for toks, _ in tr for tweet in toks for t in tweet)
        words = sorted(counts, key=lambda w: (-counts[w], w))[:vocab_size]
        vocab = {w: i + 2 for i, w in enumerate(words)}
        tr = [(_encode_tweets(toks, vocab, sent140_repr, max_len, vocab_size), y) for toks, y in tr]
        te = [(_encode_tweets(toks, vocab, sent140_repr, max_len, vocab_size), y) for toks, y in te]

    names = [u for u, *_ in train]
    x = torch.from_numpy(np.concatenate([a for a, _ in tr + te]))
    y = torch.from_numpy(np.concatenate([b for _, b in tr + te]))
    n_train = np.array([len(b) for _, b in tr])
    offsets = np.concatenate([[0], np.cumsum(n_train)])
    client_train = [np.arange(offsets[k], offsets[k + 1]) for k in range(len(names))]
    test_start, start, test_of = int(offsets[-1]), int(offsets[-1]), {}
    for (u, *_), (_, b) in zip(test, te):
        test_of[u] = np.arange(start, start + len(b))
        start += len(b)
    client_test = [test_of.get(u, np.zeros(0, dtype=np.int64)) for u in names]
    return FederatedDataset(
        x,
        y,
        client_train,
        x[test_start:],
        y[test_start:],
        num_classes,
        client_test_indices=client_test,
        client_names=names,
    )
