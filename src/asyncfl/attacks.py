"""What a malicious client does: one definition for the simulator and the network client.

Every kind but `label_flip` rewrites the delta a client trained honestly, just before it is
encoded; `label_flip` instead trains on labels y -> C - 1 - y (the runtimes flip the data, the
delta is left as trained):

- `sign_flip`: delta x -factor;
- `scale`: delta x factor;
- `gaussian`: the delta replaced by N(0, noise_std^2) noise per coordinate, drawn from the trip's
  seed, so a run is reproducible and two trips send different noise;
- `collude`: every malicious client sends the same vector, N(0, noise_std^2) per coordinate
  drawn from the shared attack `seed` (the same in every trip and client): colluders agree on one
  update, so they reinforce each other and look alike to a defence that compares updates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # the config imports this module, and must stay light without torch
    import torch

AttackKind = Literal["sign_flip", "scale", "gaussian", "label_flip", "collude"]
KINDS: tuple[str, ...] = AttackKind.__args__


def flip_labels(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The labels a label-flipping client trains on: class c becomes C - 1 - c."""
    return num_classes - 1 - y


def _noise(like: torch.Tensor, std: float, seed: int) -> torch.Tensor:
    import torch

    gen = torch.Generator().manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)
    return torch.randn(like.shape, generator=gen, dtype=like.dtype) * std


@dataclass(frozen=True)
class Attack:
    kind: AttackKind
    factor: float = 10.0
    noise_std: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"attack kind: {self.kind!r} is not one of {', '.join(KINDS)}")
        for name in ("factor", "noise_std"):
            if not getattr(self, name) > 0:
                raise ValueError(f"attack {name}: must be > 0, got {getattr(self, name)}")

    @property
    def flips_labels(self) -> bool:
        return self.kind == "label_flip"

    def corrupt(self, delta: torch.Tensor, trip_seed: int) -> torch.Tensor:
        """The delta the malicious client sends instead of `delta` (a new tensor, or `delta`
        itself for label_flip, whose harm is already in the training)."""
        kind = self.kind
        if kind == "sign_flip":
            return delta * -self.factor
        if kind == "scale":
            return delta * self.factor
        if kind == "gaussian":
            return _noise(delta, self.noise_std, trip_seed)
        if kind == "collude":
            return _noise(delta, self.noise_std, self.seed)
        return delta
