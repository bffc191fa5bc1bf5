"""``SyntheticLMDataset``: a learnable language-modelling dataset made on the fly, no downloads.

Sample ``i`` is an arithmetic progression modulo ``vocab_size``:
``x[t] = (start + stride * t) % vocab_size``, with ``start`` uniform over the vocabulary and
``stride`` drawn from a small set, both from ``np.random.default_rng([seed, i])``; then each
token is independently replaced by a uniform random one with probability ``noise``.

Why this shape: it is cheap (vectorised, no per-token Python loop), any rank can make any
index, and it is learnable at two depths, so a demo's loss visibly falls whatever the model:
- from the previous token alone the next is one of ``len(strides)`` values
  (a bigram model drops from ``log(vocab_size)`` to about ``log(len(strides))`` nats);
- from the previous two tokens it is determined (a model with context goes towards the
  noise floor).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from elastic_ckpt.errors import ConfigError

DEFAULT_STRIDES = (1, 2, 3, 5)


class SyntheticLMDataset:
    """``len == num_samples`` samples of ``{"input_ids": LongTensor[seq_len]}``.

    Only ``input_ids`` is returned: the next-token shift (``labels = input_ids[..., 1:]``
    against ``logits[..., :-1, :]``) is the loss function's job, as for ``ParquetDataset``.
    Deterministic in ``(seed, strides, noise, seq_len, vocab_size, index)`` alone.
    """

    def __init__(
        self,
        num_samples: int,
        seq_len: int,
        vocab_size: int,
        seed: int = 0,
        *,
        strides: Sequence[int] = DEFAULT_STRIDES,
        noise: float = 0.0,
    ) -> None:
        for name, value, minimum in (
            ("num_samples", num_samples, 1),
            ("seq_len", seq_len, 2),  # at least one (input, next token) pair
            ("vocab_size", vocab_size, 2),
            ("seed", seed, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ConfigError(f"{name} must be an integer, got {value!r}", field=name)
            if value < minimum:
                raise ConfigError(f"{name} must be >= {minimum}, got {value}", field=name)
        if not strides or any(int(s) <= 0 for s in strides):
            raise ConfigError(
                f"strides must be a non-empty list of positive integers, got {list(strides)}",
                field="strides",
            )
        if not 0.0 <= noise <= 1.0:
            raise ConfigError(f"noise must be in [0, 1], got {noise}", field="noise")
        self.num_samples = int(num_samples)
        self.seq_len = int(seq_len)
        self.vocab_size = int(vocab_size)
        self.seed = int(seed)
        self.strides = np.asarray([int(s) for s in strides], dtype=np.int64)
        self.noise = float(noise)
        self._positions = np.arange(self.seq_len, dtype=np.int64)

    def __repr__(self) -> str:
        return (
            f"SyntheticLMDataset(num_samples={self.num_samples}, seq_len={self.seq_len}, "
            f"vocab_size={self.vocab_size}, seed={self.seed}, "
            f"strides={self.strides.tolist()}, noise={self.noise})"
        )

    def __len__(self) -> int:
        return self.num_samples

    def tokens(self, index: int) -> np.ndarray:
        """Sample ``index`` as an ``int64`` numpy array of length ``seq_len``."""
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"index must be an integer, got {type(index).__name__}")
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        rng = np.random.default_rng([self.seed, int(index)])
        start = rng.integers(self.vocab_size)
        stride = self.strides[rng.integers(len(self.strides))]
        out = (start + stride * self._positions) % self.vocab_size
        if self.noise > 0.0:
            mask = rng.random(self.seq_len) < self.noise
            out[mask] = rng.integers(self.vocab_size, size=int(mask.sum()))
        return out

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.from_numpy(self.tokens(index))}
