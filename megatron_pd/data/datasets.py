"""Training data through megatron-core: checked prefixes, GPTDataset splits, per-rank batches.

The train/valid/test splits come from megatron's BlendedMegatronDatasetBuilder (weighted blends,
document split, seeded shuffle). Sample order is a pure function of ``data.seed``; after ``c``
consumed samples the next global batch is samples ``[c, c+G)`` of the train split (G = global
batch size) and data-parallel rank ``r`` takes the ``r``-th contiguous block of it, so
resumption (with any DP size, even another global batch size) continues the same sequence.
Validation always uses the same first ``eval_batches`` global batches of the valid split, so
validation losses are comparable across a run.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

import numpy
import torch

_IDX_MAGIC = b"MMIDIDX\x00\x00"
_DTYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 4, 7: 8, 8: 2}  # megatron DType codes
_DTYPE_NAMES = {
    1: "uint8",
    2: "int8",
    3: "int16",
    4: "int32",
    5: "int64",
    6: "float32",
    7: "float64",
    8: "uint16",
}


@dataclass
class PrefixInfo:
    """What a checked .bin/.idx pair holds."""

    prefix: str
    dtype_code: int
    sequences: int
    documents: int
    tokens: int


def meta_path(prefix: str) -> str:
    """Sidecar written by preprocessing: tokenizer fingerprint, counts."""
    return prefix + ".meta.json"


def check_prefix(prefix: str) -> PrefixInfo:
    """Validate a megatron indexed dataset without trusting it; ValueError names the file.

    Checks that both files exist, the .idx header (magic, version, dtype) and that the .bin
    size equals what the index says - the failure modes of a missing, truncated or foreign
    file, which megatron itself reports only as an assertion deep in its reader.
    """
    idx_path, bin_path = prefix + ".idx", prefix + ".bin"
    for path in (idx_path, bin_path):
        if not os.path.isfile(path):
            raise ValueError(f"data prefix {prefix}: {path} does not exist")
    size = os.path.getsize(idx_path)
    with open(idx_path, "rb") as f:
        header = f.read(9 + 8 + 1 + 8 + 8)
    if len(header) < 34 or header[:9] != _IDX_MAGIC:
        raise ValueError(f"{idx_path} is not a megatron index file (bad magic header)")
    version = struct.unpack("<Q", header[9:17])[0]
    code = header[17]
    sequences, documents = struct.unpack("<QQ", header[18:34])
    if version != 1:
        raise ValueError(f"{idx_path}: unsupported index version {version}")
    if code not in _DTYPE_SIZES:
        raise ValueError(f"{idx_path}: unknown token dtype code {code}")
    expected_idx = 34 + sequences * (4 + 8) + documents * 8
    if size < expected_idx:
        raise ValueError(
            f"{idx_path} is truncated or corrupt: {size} bytes, the header promises "
            f"{expected_idx} ({sequences} sequences, {documents} document offsets)"
        )
    lengths = numpy.memmap(idx_path, dtype=numpy.int32, mode="r", offset=34, shape=(sequences,))
    if sequences and int(lengths.min()) < 0:
        raise ValueError(f"{idx_path} is corrupt: negative sequence length")
    tokens = int(lengths.sum(dtype=numpy.int64))
    del lengths
    expected_bin = tokens * _DTYPE_SIZES[code]
    actual_bin = os.path.getsize(bin_path)
    if actual_bin != expected_bin:
        raise ValueError(
            f"{bin_path} has {actual_bin} bytes but {idx_path} describes {tokens} "
            f"{_DTYPE_NAMES[code]} tokens ({expected_bin} bytes): truncated or mismatched pair"
        )
    return PrefixInfo(prefix, code, sequences, documents - 1, tokens)


def parse_blend(blend: list) -> tuple:
    """``["p1", "p2"]`` or ``["0.3", "p1", "0.7", "p2"]`` -> (prefixes, weights or None)."""
    if not blend:
        raise ValueError("data.blend is empty: name at least one data prefix")

    def is_number(text):
        try:
            float(text)
            return True
        except ValueError:
            return False

    if len(blend) % 2 == 0 and all(is_number(w) for w in blend[0::2]):
        weights = [float(w) for w in blend[0::2]]
        prefixes = list(blend[1::2])
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"data.blend weights {weights} must be >= 0 and not all zero")
        return prefixes, weights
    if any(is_number(p) for p in blend):
        raise ValueError(f"data.blend={blend}: give either prefixes only or weight, prefix pairs")
    return list(blend), None


def check_data(blend: list, tokenizer) -> list:
    """Check every prefix of the blend and its tokenizer sidecar; returns the PrefixInfos."""
    prefixes, _ = parse_blend(blend)
    infos = []
    for prefix in prefixes:
        info = check_prefix(prefix)
        if os.path.isfile(meta_path(prefix)):
            with open(meta_path(prefix)) as f:
                meta = json.load(f)
            made_with = meta.get("tokenizer_fingerprint")
            if made_with and made_with != tokenizer.fingerprint:
                raise ValueError(
                    f"data prefix {prefix} was tokenized with tokenizer {made_with} "
                    f"({meta.get('tokenizer_model')}), not data.tokenizer_model "
                    f"{tokenizer.path} ({tokenizer.fingerprint})"
                )
        if tokenizer.vocab_size > 65536 and info.dtype_code == 8:
            raise ValueError(f"{prefix}.idx stores uint16 tokens but the vocabulary is larger")
        infos.append(info)
    return infos


@dataclass
class Splits:
    train: object
    valid: object
    test: object


def build_splits(data_cfg, tokenizer, num_samples: tuple, cache_dir: str) -> Splits:
    """megatron GPTDatasets for (train, valid, test) with at least ``num_samples`` each.

    Collective over the default group (megatron builds index caches on rank 0 first).
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    prefixes, weights = parse_blend(data_cfg.blend)
    config = GPTDatasetConfig(
        random_seed=data_cfg.seed,
        sequence_length=data_cfg.seq_length,
        blend=(prefixes, weights),
        split=data_cfg.split.replace("/", ","),
        path_to_cache=cache_dir,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=data_cfg.eod_mask_loss,
        create_attention_mask=False,
        mid_level_dataset_surplus=0.005,
    )
    _check_split_documents(prefixes, config.split_matrix, data_cfg.split)
    sizes = [int(n) for n in num_samples]
    train, valid, test = BlendedMegatronDatasetBuilder(
        GPTDataset, sizes, lambda: True, config
    ).build()
    for name, dataset, wanted in zip(("train", "valid", "test"), (train, valid, test), sizes):
        if wanted and (dataset is None or len(dataset) == 0):
            raise ValueError(
                f"data.split={data_cfg.split!r} leaves no {name} documents for "
                f"data.blend={data_cfg.blend}"
            )
    return Splits(train, valid, test)


def _check_split_documents(prefixes, split_matrix, split: str) -> None:
    """Every non-zero part of ``data.split`` must get documents of every prefix.

    megatron-core slices each prefix's documents by rounding the split fractions; a part that
    rounds to no documents has no tokens per epoch, and its GPTDataset would loop forever
    counting epochs. Catch that before building, naming the prefix.
    """
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    for prefix in prefixes:
        documents = IndexedDataset(prefix).sequence_lengths.shape[0]
        for name, part in zip(("train", "valid", "test"), split_matrix):
            if part is None:
                continue
            begin, end = round(part[0] * documents), round(part[1] * documents)
            if end <= begin:
                raise ValueError(
                    f"data.split={split!r} leaves the {name} split no documents of {prefix} "
                    f"({documents} documents): use more documents or give {name} no share "
                    "(e.g. data.split=100,0,0)"
                )


class GlobalBatchSampler:
    """Indices of this rank's micro-batches for the global batch of a given step."""

    def __init__(self, global_batch_size: int, micro_batch_size: int, dp_size: int, dp_rank: int):
        if global_batch_size % (micro_batch_size * dp_size):
            raise ValueError(
                f"global batch {global_batch_size} is not a multiple of "
                f"micro batch {micro_batch_size} x data-parallel size {dp_size}"
            )
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.per_rank = global_batch_size // dp_size
        self.dp_rank = dp_rank

    @property
    def num_microbatches(self) -> int:
        return self.per_rank // self.micro_batch_size

    def microbatch_indices(self, consumed_samples: int) -> list:
        """Sample ids (into the split) of this rank's micro-batches of the global batch that
        starts after ``consumed_samples`` samples."""
        start = consumed_samples + self.dp_rank * self.per_rank
        return [
            list(range(start + m * self.micro_batch_size, start + (m + 1) * self.micro_batch_size))
            for m in range(self.num_microbatches)
        ]


class SampleIds:
    """Unshuffled, global ids of the samples of a (possibly blended) GPTDataset split.

    Megatron shuffles samples with ``shuffle_index``; the id of a sample *before* shuffling
    (offset by the preceding blend components) names the same token window whatever the batch
    sizes, data-parallel size or consumption order - the key of the offline logits store.
    """

    def __init__(self, dataset):
        self.blend = dataset if hasattr(dataset, "dataset_index") else None
        self.components = list(dataset.datasets) if self.blend is not None else [dataset]
        lengths = [len(c) for c in self.components]
        self.offsets = numpy.concatenate([[0], numpy.cumsum(lengths)]).astype(numpy.int64)
        self._inverse: dict = {}

    @property
    def total(self) -> int:
        return int(self.offsets[-1])

    def of(self, indices) -> numpy.ndarray:
        """Global unshuffled ids of shuffled split indices."""
        indices = numpy.asarray(indices, dtype=numpy.int64)
        if self.blend is None:
            return self.components[0].shuffle_index[indices].astype(numpy.int64)
        component = self.blend.dataset_index[indices].astype(numpy.int64)
        within = self.blend.dataset_sample_index[indices].astype(numpy.int64)
        ids = numpy.empty(len(indices), dtype=numpy.int64)
        for c in numpy.unique(component):
            sel = component == c
            ids[sel] = self.offsets[c] + self.components[c].shuffle_index[within[sel]]
        return ids

    def sample(self, global_id: int) -> dict:
        """The megatron sample (tokens, labels, ...) with this unshuffled id."""
        c = int(numpy.searchsorted(self.offsets, global_id, side="right") - 1)
        if c not in self._inverse:
            shuffle = self.components[c].shuffle_index
            inverse = numpy.empty_like(shuffle)
            inverse[shuffle] = numpy.arange(len(shuffle), dtype=shuffle.dtype)
            self._inverse[c] = inverse
        return self.components[c][int(self._inverse[c][global_id - self.offsets[c]])]

    def fingerprint(self) -> str:
        """Hash of what defines every sample: token files, windows (document and sample
        indices, which the split, seed and sequence length produce) and sequence length."""
        import hashlib

        digest = hashlib.sha256()
        for component in self.components:
            path = component.dataset_path
            with open(path + ".idx", "rb") as f:
                digest.update(hashlib.sha256(f.read()).digest())
            digest.update(str(os.path.getsize(path + ".bin")).encode())
            digest.update(str(component.config.sequence_length).encode())
            digest.update(numpy.ascontiguousarray(component.document_index).tobytes())
            digest.update(numpy.ascontiguousarray(component.sample_index).tobytes())
        return digest.hexdigest()[:24]


def sample_ids_of(splits: Splits) -> dict:
    """{"train": SampleIds, "valid": SampleIds} of the splits that exist."""
    return {
        name: SampleIds(getattr(splits, name))
        for name in ("train", "valid")
        if getattr(splits, name) is not None
    }


def collate(samples: list) -> dict:
    """Stack megatron samples into a batch: tokens, labels, loss_mask, position_ids [B, S]."""
    batch = {
        key: torch.stack([s[key] for s in samples])
        for key in ("tokens", "labels", "loss_mask", "position_ids")
    }
    return batch


def microbatches(
    dataset, sampler: GlobalBatchSampler, consumed_samples: int, ids: SampleIds | None = None
) -> list:
    """This rank's collated micro-batches of the next global batch (wrapping around); with
    ``ids``, each carries ``sample_ids`` (unshuffled, global) too."""
    size = len(dataset)
    batches = []
    for indices in sampler.microbatch_indices(consumed_samples):
        wrapped = [i % size for i in indices]
        batch = collate([dataset[i] for i in wrapped])
        if ids is not None:
            batch["sample_ids"] = torch.from_numpy(ids.of(wrapped))
        batches.append(batch)
    return batches
