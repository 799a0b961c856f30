"""Nothing loaded from a user's files runs code: checkpoint metadata and objects unpickled
under allow-lists.

torch.distributed.checkpoint (which megatron-core's dist_checkpointing writes and reads)
stores its ``.metadata`` file with ``pickle`` and reads it back with ``pickle.load``, and its
default load planner reads byte objects (megatron's RNG states, modules' ``_extra_state``)
with ``torch.load(weights_only=False)``: a crafted checkpoint could run anything on load.
``install()`` replaces those two readers, process-wide and idempotently:

* ``.metadata``: an Unpickler whose ``find_class`` admits only the checkpoint metadata
  classes (torch.distributed.checkpoint.*), torch.Size, torch dtypes, layouts and memory
  formats, path objects (the checkpoint id torch records), and a few builtins; anything
  else is a ValueError naming the file and the class;
* byte objects: ``torch.load(weights_only=True)`` (torch's own restricted unpickler).

Writing is unchanged. Every other loader of ours reads no pickle at all: safetensors for HF
weights (a ``.bin`` is refused), JSON/YAML headers, our own shard format; the common state
``common.pt`` is read by ``torch.load`` with torch's default ``weights_only=True``.
"""

from __future__ import annotations

import io
import pickle

import torch

_BUILTINS = {"set", "frozenset", "slice", "complex", "tuple", "list", "dict", "bytearray"}
_PATHS = {"Path", "PosixPath", "PurePath", "PurePosixPath", "WindowsPath", "PureWindowsPath"}
_INSTALLED = False


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles a torch.distributed.checkpoint Metadata, nothing else."""

    source = "checkpoint metadata"

    def find_class(self, module: str, name: str):
        allowed = (
            module.startswith("torch.distributed.checkpoint")
            or (module == "builtins" and name in _BUILTINS)
            or (module == "collections" and name == "OrderedDict")
            or (module == "torch" and name == "Size")
            or (
                module == "torch"
                and isinstance(
                    getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)
                )
            )
            or (module == "torch.serialization" and name == "_get_layout")
            # torch records the checkpoint_id it was given, a str or a path object
            or (module in ("pathlib", "pathlib._local") and name in _PATHS)
        )
        if not allowed:
            raise ValueError(
                f"{self.source}: refuses to load {module}.{name} (only checkpoint metadata "
                "classes may be unpickled; a crafted file could run code)"
            )
        return super().find_class(module, name)


def load_metadata(stream, source: str = "checkpoint metadata"):
    """A torch.distributed.checkpoint Metadata from ``stream``, unpickled under the allow-list."""
    unpickler = _MetadataUnpickler(stream)
    unpickler.source = source
    return unpickler.load()


class _PickleModule:
    """Stands in for the ``pickle`` module inside torch.distributed.checkpoint.filesystem:
    dumps as pickle does, loads under the allow-list."""

    dump = staticmethod(pickle.dump)
    dumps = staticmethod(pickle.dumps)
    HIGHEST_PROTOCOL = pickle.HIGHEST_PROTOCOL

    @staticmethod
    def load(stream, *args, **kwargs):
        name = getattr(stream, "name", "checkpoint metadata")
        return load_metadata(stream, f"checkpoint metadata {name}")


def install() -> None:
    """Make torch.distributed.checkpoint's loaders safe in this process (idempotent)."""
    global _INSTALLED
    if _INSTALLED:
        return
    _INSTALLED = True
    from torch.distributed.checkpoint import default_planner, filesystem

    filesystem.pickle = _PickleModule

    def load_bytes(self, read_item, value: io.BytesIO) -> None:  # weights_only, always
        loaded = torch.load(value, map_location="cpu", weights_only=True)
        if self.flatten_state_dict:
            default_planner.set_element(
                self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded
            )
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded

    default_planner.DefaultLoadPlanner.load_bytes = load_bytes
