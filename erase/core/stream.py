"""Endless batch streams: every batch a fresh draw, epochs reshuffled, positions saved with checkpoints.

The research code's ``next(iter(loader))`` sees the same first batch at every step; here a stream walks a
fresh permutation per epoch (seeded by ``seed`` and the epoch), so ``num_batches`` draws really are distinct
batches. Each step draws one *global* batch of ``batch_size × world`` indices and a process keeps its slice, so a
run on one process sees the same examples per step as a run on several. ``state_dict`` / ``load_state_dict`` make
resumed runs draw exactly what an uninterrupted run would.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


class EndlessStream:
    def __init__(
        self,
        n: int,
        batch_size: int,
        collate: Callable[[list[int]], object],
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        shuffle: bool = True,
        name: str = "stream",
    ):
        if n <= 0:
            raise ValueError(f"{name} is empty: it needs at least one example")
        if batch_size <= 0:
            raise ValueError(f"{name}: batch size must be positive, got {batch_size}")
        self.n, self.batch_size, self.collate = int(n), int(batch_size), collate
        self.seed, self.rank, self.world, self.shuffle, self.name = int(seed), int(rank), int(world), shuffle, name
        self.epoch, self.pos, self.draws = 0, 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def next_indices(self) -> list[int]:
        """Indices of this process's share of the next global batch."""
        out: list[int] = []
        need = self.batch_size * self.world
        while len(out) < need:
            if self.pos >= self.n:
                self.epoch += 1
                self.pos = 0
                self._order = self._permutation(self.epoch)
            take = min(need - len(out), self.n - self.pos)
            out.extend(self._order[self.pos : self.pos + take])
            self.pos += take
        self.draws += 1
        return out[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]

    def __iter__(self):
        return self

    def __next__(self):
        return self.collate(self.next_indices())

    @property
    def steps_per_epoch(self) -> int:
        return max(1, -(-self.n // (self.batch_size * self.world)))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "draws": self.draws, "seed": self.seed, "n": self.n}

    def load_state_dict(self, state: dict) -> None:
        if int(state["n"]) != self.n:
            raise ValueError(f"{self.name}: checkpoint was made with {state['n']} examples, this run has {self.n}")
        self.seed, self.epoch, self.pos, self.draws = int(state["seed"]), int(state["epoch"]), int(state["pos"]), int(state["draws"])
        self._order = self._permutation(self.epoch)


def stack_collate(*tensors: torch.Tensor) -> Callable[[Sequence[int]], tuple]:
    """Collate that indexes aligned tensors, e.g. ``(x, y)``."""
    def collate(idx):
        ix = torch.as_tensor(list(idx), dtype=torch.long)
        return tuple(t[ix] for t in tensors)
    return collate
