"""Read torch.distributed.checkpoint (DCP) folders without running code from them.

torch's `FileSystemReader.read_metadata` reads a folder's `.metadata` file with a bare `pickle.load`, so a
checkpoint folder planted by someone else (a format-2 checkpoint's `dense/`, picked up by `resume=auto`,
`ckpt_path=`, `moe-plugin ckpt ...`, `convert to-hf`) would run arbitrary code when loaded. The tensor payloads
are safe already (torch reads them with `weights_only=True`); the metadata is the hole.

`SafeFileSystemReader` reads the metadata with an unpickler that resolves only the classes DCP's own metadata
is made of: the dataclasses of torch.distributed.checkpoint.metadata and the filesystem's storage info, torch
dtypes and `torch.Size`, a path, and a few builtin containers. Anything else (`os.system`, `builtins.eval`,
any `__reduce__` gadget) raises UnsafeCheckpointError naming the file, before any of it runs.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from moe_plugin.errors import CheckpointError, UnsafeCheckpointError

# (module, name) pairs DCP metadata pickles reference in torch 2.13 (found by recording find_class on the
# metadata of dense states holding float32, bfloat16 and int64 tensors and DTensor shards)
_ALLOWED_MODULE_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "ChunkStorageMetadata",
        "TensorProperties",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset", "slice"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            return getattr(torch, name)
        if name in _ALLOWED_MODULE_CLASSES.get(module, ()):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in DCP metadata")


def read_metadata_safely(path: str | Path) -> Metadata:
    """The Metadata object of a DCP `.metadata` file, or UnsafeCheckpointError / CheckpointError naming it."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(
            f"refusing to load checkpoint metadata {path}: {err}; loading it could run arbitrary code. Checkpoints "
            "written by moe_plugin never need this: use one moe_plugin wrote."
        ) from None
    except (EOFError, OSError, ValueError, TypeError, AttributeError) as err:
        raise CheckpointError(
            f"checkpoint metadata {path} is unreadable ({type(err).__name__}: {str(err)[:200]}): truncated or not a "
            "DCP folder. Use another checkpoint (resume=auto picks the newest valid one)."
        ) from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"checkpoint metadata {path} holds a {type(metadata).__name__}, not DCP Metadata.")
    return metadata


class SafeFileSystemReader(dcp.FileSystemReader):
    """dcp.FileSystemReader whose metadata read cannot run code (see the module docstring)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        name = ".metadata" if rank is None else f"__{rank}.metadata"
        metadata = read_metadata_safely(Path(self.path) / name)
        # what the parent does after unpickling: a load id for this read
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata
