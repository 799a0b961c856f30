"""Vocabulary partition math: the true vocabulary, its padding, and each tp rank's shard.

Pure arithmetic (no process groups, no model code), so the loss, the truncation, the
exchange and the model builder share it without importing each other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class VocabInfo:
    """True and padded vocabulary sizes and this rank's slice of the padded vocabulary."""

    true_size: int
    padded_size: int
    tp_size: int
    tp_rank: int

    @property
    def shard_size(self) -> int:
        return self.padded_size // self.tp_size

    @property
    def shard_start(self) -> int:
        return self.tp_rank * self.shard_size

    @property
    def valid_in_shard(self) -> int:
        """Columns of this rank's shard that belong to the true vocabulary."""
        return max(0, min(self.shard_size, self.true_size - self.shard_start))


def padded_vocab_size(true_size: int, divisible_by: int, tp_size: int) -> int:
    """Smallest multiple of ``divisible_by * tp_size`` that holds the true vocabulary."""
    multiple = divisible_by * tp_size
    return int(math.ceil(true_size / multiple) * multiple)


def model_padded_vocab(model_cfg, true_size: int, tp_size: int) -> int:
    """The embedding rows of a model: ``model.padded_vocab_size`` when a checkpoint fixed it,
    else the true vocabulary padded to ``make_vocab_size_divisible_by * tp``."""
    if model_cfg.padded_vocab_size is not None:
        return int(model_cfg.padded_vocab_size)
    return padded_vocab_size(true_size, model_cfg.make_vocab_size_divisible_by, tp_size)
