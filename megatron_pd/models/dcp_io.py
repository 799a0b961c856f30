"""Tensor-by-tensor access to megatron dist checkpoints (torch_dist format) without a model.

megatron-core's ``torch_dist`` checkpoints are torch.distributed.checkpoint (DCP) directories
(``.metadata`` + ``__R_I.distcp`` files) with megatron's ``metadata.json`` and ``common.pt``
beside them. Every parameter is one DCP tensor under its sharded-state-dict key, layer
parameters stacked along a leading layer axis ([num_layers, ...]) and stored in chunks.

* ``CheckpointTensors(dir).read(key, offsets, sizes)`` reads any region of a tensor - one
  layer, one TP slice - through DCP's own read planning (only the chunks that overlap it), so an
  export never holds more than one layer's tensor.
* ``write_checkpoint(dir, tensors, objects, common)`` writes such a directory from *producers*:
  each chunk's data is computed only when DCP's writer asks for it and dropped once written, so
  an import holds one chunk (one layer's tensor) at a time. The result loads with
  ``dist_checkpointing.load`` at any TP/PP like a checkpoint megatron wrote itself (tested).

Both run in one process without a process group (``no_dist``).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadPlan,
    SavePlan,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list


@contextlib.contextmanager
def _one_process():
    """Silence DCP's notice that it runs without a process group (that is the intent here)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


MEGATRON_METADATA = {
    "sharded_backend": "torch_dist",
    "sharded_backend_version": 1,
    "common_backend": "torch",
    "common_backend_version": 1,
}


class CheckpointTensors:
    """Read-only view of one dist checkpoint's tensors; ValueError names the directory."""

    def __init__(self, checkpoint_dir: str):
        if not os.path.isfile(os.path.join(checkpoint_dir, "metadata.json")):
            raise ValueError(
                f"{checkpoint_dir} is not a megatron dist checkpoint (no metadata.json)"
            )
        from megatron_pd.platform import safe_loading

        safe_loading.install()
        self.checkpoint_dir = checkpoint_dir
        self._reader = FileSystemReader(checkpoint_dir)
        try:
            self.metadata = self._reader.read_metadata()
        except Exception as err:  # missing or damaged .metadata
            raise ValueError(f"{checkpoint_dir}: checkpoint metadata unreadable ({err})") from None
        self.tensors = {
            k: v
            for k, v in self.metadata.state_dict_metadata.items()
            if isinstance(v, TensorStorageMetadata)
        }

    def shape(self, key: str) -> tuple:
        if key not in self.tensors:
            raise ValueError(f"checkpoint {self.checkpoint_dir} has no tensor {key}")
        return tuple(self.tensors[key].size)

    def read(self, key: str, offsets=None, sizes=None, dtype=None) -> torch.Tensor:
        """The region [offsets, offsets + sizes) of tensor ``key`` (the whole tensor by default)."""
        shape = self.shape(key)
        offsets = tuple(offsets or (0,) * len(shape))
        sizes = tuple(sizes or shape)
        storage = self.tensors[key]
        out = torch.empty(sizes, dtype=dtype or storage.properties.dtype)
        chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))
        items = create_read_items_for_chunk_list(key, storage, [chunk])
        planner = _RegionLoadPlanner(out, offsets)
        planner.set_up_planner({}, self.metadata, True)
        self._reader.set_up_storage_reader(self.metadata, True)
        plan = self._reader.prepare_local_plan(LoadPlan(items))
        with _one_process():
            self._reader.read_data(plan, planner).wait()
        return out

    def common(self) -> dict:
        """megatron's common.pt (non-tensor state: the trainer's step, tokenizer, ...)."""
        path = os.path.join(self.checkpoint_dir, "common.pt")
        if not os.path.isfile(path):
            return {}
        return torch.load(path, map_location="cpu", weights_only=True)


class _RegionLoadPlanner(DefaultLoadPlanner):
    """DCP reads into one destination tensor that starts at ``offsets`` of the global one."""

    def __init__(self, out: torch.Tensor, offsets: tuple):
        super().__init__(allow_partial_load=True)
        self.out, self.offsets = out, offsets

    def resolve_tensor(self, read_item):
        view = self.out
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            view = view.narrow(dim, int(start), int(length))
        return view

    def commit_tensor(self, read_item, tensor) -> None:
        pass  # written in place into self.out


@dataclass
class TensorEntry:
    """One checkpoint tensor to write: global shape, dtype, and its chunks' producer."""

    key: str
    shape: tuple
    dtype: torch.dtype
    chunks: list  # [(offsets, sizes)]
    produce: Callable  # (offsets, sizes) -> tensor of that region


class _StreamingSavePlanner(DefaultSavePlanner):
    """A DCP save plan built from TensorEntry/objects; data made on demand in resolve_data."""

    def __init__(self, tensors: list, objects: dict):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.entries = {t.key: t for t in tensors}
        self.objects = objects

    def set_up_planner(self, state_dict, storage_meta=None, is_coordinator=False) -> None:
        self.state_dict, self.is_coordinator = {}, is_coordinator

    def create_local_plan(self) -> SavePlan:
        items = []
        for entry in self.entries.values():
            properties = TensorProperties(dtype=entry.dtype)
            for offsets, sizes in entry.chunks:
                items.append(
                    WriteItem(
                        index=MetadataIndex(entry.key, torch.Size(offsets)),
                        type=WriteItemType.SHARD,
                        tensor_data=TensorWriteData(
                            chunk=ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes)),
                            properties=properties,
                            size=torch.Size(entry.shape),
                        ),
                    )
                )
        for key in self.objects:
            items.append(WriteItem(index=MetadataIndex(key), type=WriteItemType.BYTE_IO))
        self.plan = SavePlan(items)
        return self.plan

    def resolve_data(self, write_item: WriteItem):
        key = write_item.index.fqn
        if write_item.type == WriteItemType.BYTE_IO:
            return io.BytesIO(self.objects[key])
        entry = self.entries[key]
        chunk = write_item.tensor_data.chunk
        tensor = entry.produce(tuple(chunk.offsets), tuple(chunk.sizes))
        if tuple(tensor.shape) != tuple(chunk.sizes):
            raise ValueError(
                f"{key}: chunk at {list(chunk.offsets)} produced shape {list(tensor.shape)}, "
                f"expected {list(chunk.sizes)}"
            )
        return tensor.to(entry.dtype).contiguous()


def serialized_object(data) -> bytes:
    """A megatron ShardedObject's bytes as its torch_dist save writes them (a list of data)."""
    buffer = io.BytesIO()
    torch.save([data], buffer)
    return buffer.getvalue()


def write_checkpoint(checkpoint_dir: str, tensors: list, objects: dict, common: dict) -> None:
    """Write a megatron torch_dist checkpoint directory atomically (temporary name, rename).

    ``tensors``: TensorEntry list; ``objects``: {DCP key: bytes} of sharded objects; ``common``:
    megatron's common state (plain Python values).
    """
    parent = os.path.dirname(os.path.abspath(checkpoint_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, "." + os.path.basename(checkpoint_dir) + ".tmp")
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    import torch.distributed.checkpoint as dcp

    writer = FileSystemWriter(tmp, single_file_per_rank=True, thread_count=1, sync_files=True)
    writer.per_thread_copy_ahead = 0  # resolve one chunk at a time
    try:
        dcp.save(
            {}, storage_writer=writer, planner=_StreamingSavePlanner(tensors, objects), no_dist=True
        )
        torch.save(common, os.path.join(tmp, "common.pt"))
        with open(os.path.join(tmp, "metadata.json"), "w") as f:
            json.dump(MEGATRON_METADATA, f)
    except BaseException as err:  # nothing half-written stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        cause = _user_error(err)
        if cause is not None:  # a tensor producer's ValueError, wrapped by the DCP writer
            raise cause from None
        raise
    if os.path.exists(checkpoint_dir):
        shutil.rmtree(checkpoint_dir)
    os.replace(tmp, checkpoint_dir)


def _user_error(err: BaseException) -> ValueError | None:
    """The ValueError (bad input, named by a producer) behind a checkpoint writer's error."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, ValueError):
            return err
        failures = getattr(err, "failures", None)  # torch's CheckpointException
        if isinstance(failures, dict):
            for failure in failures.values():
                found = _user_error(failure)
                if found is not None:
                    return found
        err = err.__cause__ or err.__context__
    return None


def layer_chunks(shape: tuple) -> list:
    """One chunk per layer of a [num_layers, ...] tensor."""
    return [
        ((layer,) + (0,) * (len(shape) - 1), (1,) + tuple(shape[1:])) for layer in range(shape[0])
    ]


def whole(shape: tuple) -> list:
    return [((0,) * len(shape), tuple(shape))]


__all__ = [
    "CheckpointTensors",
    "TensorEntry",
    "layer_chunks",
    "serialized_object",
    "whole",
    "write_checkpoint",
]
