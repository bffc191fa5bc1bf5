"""``ElasticSampler``: which samples global step ``s`` consumes, for any world size.

The sample stream is the concatenation of per-epoch permutations of ``range(num_samples)``:
epoch ``e`` is ``np.random.default_rng([seed, e]).permutation(num_samples)`` (identity order
when ``shuffle=False``). Global batch ``s`` is stream positions ``[s * B, (s + 1) * B)``. So a
batch may straddle an epoch boundary (its tail comes from the next epoch's permutation), no
sample is dropped, and every sample is consumed exactly once per epoch.

Everything is a pure function of ``(seed, shuffle, num_samples, global_batch_size, step)``:
the data cursor to checkpoint is just the step, and resuming at step ``s`` at any world size
consumes exactly what an uninterrupted run would have.
"""

from __future__ import annotations

import operator
import threading
from collections import OrderedDict

import numpy as np

from elastic_ckpt.data.eval_split import forward_passes
from elastic_ckpt.errors import ConfigError

# Two epochs are enough for every batch that straddles one boundary (B <= num_samples);
# bigger batches still work, they just regenerate permutations.
_PERM_CACHE_SIZE = 2


def _as_int(name: str, value: object, *, minimum: int) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{name} must be an integer, got {value!r}", field=name)
    try:
        out = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise ConfigError(
            f"{name} must be an integer, got {type(value).__name__} {value!r}", field=name
        ) from None
    if out < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {out}", field=name)
    return out


class ElasticSampler:
    """Sample ids per global step, per rank and per micro-batch, for any world size.

    Batches are returned as read-only 1-D ``np.int64`` arrays of dataset indices (views into a
    cached permutation where possible; copy before mutating). The sampler holds no state that
    affects results: only a cache of the last two epoch permutations, dropped on pickling.
    Thread-safe.
    """

    def __init__(
        self,
        num_samples: int,
        global_batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        self.num_samples = _as_int("num_samples", num_samples, minimum=1)
        self.global_batch_size = _as_int("global_batch_size", global_batch_size, minimum=1)
        # default_rng's SeedSequence takes non-negative integers only.
        self.seed = _as_int("seed", seed, minimum=0)
        self.shuffle = bool(shuffle)
        self._perms: OrderedDict[int, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"ElasticSampler(num_samples={self.num_samples}, "
            f"global_batch_size={self.global_batch_size}, seed={self.seed}, "
            f"shuffle={self.shuffle})"
        )

    # Ray and DataLoader workers pickle the sampler; locks don't pickle, caches needn't travel.
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        del state["_perms"], state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._perms = OrderedDict()
        self._lock = threading.Lock()

    # -- epochs -----------------------------------------------------------------------------
    @property
    def steps_per_epoch(self) -> int:
        """Steps needed to consume one epoch: ``ceil(num_samples / global_batch_size)``.

        When the division is not exact the last of those steps straddles into the next epoch,
        so use :meth:`steps_for_epochs` (not ``n * steps_per_epoch``) for several epochs.
        """
        return self.steps_for_epochs(1)

    def steps_for_epochs(self, num_epochs: int) -> int:
        """The smallest step count whose batches cover ``num_epochs`` full epochs."""
        num_epochs = _as_int("num_epochs", num_epochs, minimum=0)
        return -(-num_epochs * self.num_samples // self.global_batch_size)

    def epoch_of(self, step: int) -> int:
        """The epoch of the first sample of global batch ``step``."""
        step = _as_int("step", step, minimum=0)
        return step * self.global_batch_size // self.num_samples

    def permutation(self, epoch: int) -> np.ndarray:
        """The read-only order of dataset indices in ``epoch`` (cached, LRU of two)."""
        epoch = _as_int("epoch", epoch, minimum=0)
        with self._lock:
            perm = self._perms.get(epoch)
            if perm is not None:
                self._perms.move_to_end(epoch)
                return perm
        if self.shuffle:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
        else:
            perm = np.arange(self.num_samples)
        perm = perm.astype(np.int64, copy=False)
        perm.flags.writeable = False  # callers get views; a write would corrupt the cache
        with self._lock:
            self._perms[epoch] = perm
            self._perms.move_to_end(epoch)
            while len(self._perms) > _PERM_CACHE_SIZE:
                self._perms.popitem(last=False)
        return perm

    def _stream(self, start: int, stop: int) -> np.ndarray:
        """Stream positions ``[start, stop)`` of the concatenated epoch permutations."""
        n = self.num_samples
        parts = []
        pos = start
        while pos < stop:
            epoch, offset = divmod(pos, n)
            take = min(n - offset, stop - pos)
            parts.append(self.permutation(epoch)[offset : offset + take])
            pos += take
        if len(parts) == 1:
            return parts[0]
        out = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
        out.flags.writeable = False
        return out

    # -- batches ----------------------------------------------------------------------------
    def global_batch(self, step: int) -> np.ndarray:
        """The ``global_batch_size`` sample ids of global step ``step`` (0-based)."""
        step = _as_int("step", step, minimum=0)
        b = self.global_batch_size
        return self._stream(step * b, (step + 1) * b)

    def local_range(self, rank: int, world_size: int) -> tuple[int, int]:
        """``(start, stop)`` of ``rank``'s contiguous slice of every global batch.

        The first ``global_batch_size % world_size`` ranks get one extra sample; ranks past
        the global batch size get an empty slice.
        """
        world_size = _as_int("world_size", world_size, minimum=1)
        rank = _as_int("rank", rank, minimum=0)
        if rank >= world_size:
            raise ConfigError(
                f"rank must be < world_size ({world_size}), got {rank}", field="rank"
            )
        base, extra = divmod(self.global_batch_size, world_size)
        start = rank * base + min(rank, extra)
        return start, start + base + (1 if rank < extra else 0)

    def local_batch(self, step: int, rank: int, world_size: int) -> np.ndarray:
        """``rank``'s share of global batch ``step`` at ``world_size``.

        The shares of ranks ``0..world_size-1``, concatenated in rank order, are exactly
        ``global_batch(step)``; their sizes differ by at most one. When ``world_size`` exceeds
        the global batch size some ranks get an empty array: such a rank must still take part
        in every collective of the step (forward/backward nothing, contribute zero gradient
        weight), or the others hang.
        """
        step = _as_int("step", step, minimum=0)
        start, stop = self.local_range(rank, world_size)
        base = step * self.global_batch_size
        return self._stream(base + start, base + stop)

    def micro_batches(
        self, step: int, rank: int, world_size: int, micro_batch_size: int
    ) -> list[np.ndarray]:
        """``local_batch(step, rank, world_size)`` split in order into chunks of at most
        ``micro_batch_size`` (only the last may be shorter); ``[]`` for an empty share, with
        the same duty to join collectives as :meth:`local_batch` describes."""
        micro_batch_size = _as_int("micro_batch_size", micro_batch_size, minimum=1)
        local = self.local_batch(step, rank, world_size)
        return [local[i : i + micro_batch_size] for i in range(0, len(local), micro_batch_size)]

    # -- one training step -----------------------------------------------------------------
    def step_passes(
        self, step: int, rank: int, world_size: int, micro_batch_size: int
    ) -> list[tuple[np.ndarray, int]]:
        """``rank``'s forward/backward passes of global step ``step``: ``(ids, weight)`` in
        order, ``weight`` being the samples that count (``len(ids)``).

        Every rank gets the same number of passes, ``forward_passes(global_batch_size,
        world_size, micro_batch_size)``: FSDP all-gathers in each, so a rank with a smaller
        share runs filler passes after its :meth:`micro_batches`, each ``(first id of the
        global batch, 0)``: run them like the others, their weight makes them count nothing.
        Multiply each pass's loss by ``weight * loss_scale(world_size)`` before ``backward``.
        """
        micro = self.micro_batches(step, rank, world_size, micro_batch_size)
        n_passes = forward_passes(self.global_batch_size, world_size, micro_batch_size)
        filler = self.global_batch(step)[:1]
        return [(micro[i], len(micro[i])) if i < len(micro) else (filler, 0)
                for i in range(n_passes)]

    def loss_scale(self, world_size: int) -> float:
        """``world_size / global_batch_size``: a pass's loss times ``weight * loss_scale``
        makes the gradient the mean over the global batch, once FSDP has averaged the ranks'
        gradients (a mean over ranks, hence the ``world_size``)."""
        world_size = _as_int("world_size", world_size, minimum=1)
        return world_size / self.global_batch_size

    # -- checkpoint metadata ----------------------------------------------------------------
    def state_dict(self) -> dict[str, int | bool]:
        """The defining parameters, JSON-able. The sampler has no mutable state (the data
        cursor is the step); a checkpoint stores this so a resume can check it matches."""
        return {
            "num_samples": self.num_samples,
            "global_batch_size": self.global_batch_size,
            "seed": self.seed,
            "shuffle": self.shuffle,
        }

    def load_state_dict(self, state: dict) -> None:
        """Check a stored :meth:`state_dict` against this sampler.

        Raises ``ConfigError`` naming the first differing field: resuming with another order
        would silently skip and repeat samples.
        """
        mine = self.state_dict()
        for key, value in mine.items():
            if key not in state:
                raise ConfigError(f"sampler state has no {key!r}", field=key)
            if state[key] != value:
                raise ConfigError(
                    f"sampler {key} differs from the checkpoint: checkpoint has "
                    f"{state[key]!r}, this run has {value!r}; resume with the same value "
                    "or start a new run",
                    field=key,
                )
