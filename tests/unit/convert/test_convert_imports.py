"""moe_plugin.convert is model surgery in pure torch: it may import torch, layers/ and itself only.

Format converters (checkpoint files of other engines) also read files and use the checkpoint readers that own
those formats (parallel/ and the safe loader in lightning/checkpoint_io.py), and the engine's own classes to
allow-list them; they still never run a collective (no torch.distributed)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

CONVERT = Path(__file__).resolve().parents[3] / "moe_plugin" / "convert"
STDLIB_OK = {
    "functools",
    "__future__",
    "logging",
    "copy",
    "dataclasses",
    "re",
    "warnings",
    "collections",
    "collections.abc",
    "typing",
    "math",
}


FORMAT_CONVERTERS = {"deepspeed_checkpoint.py"}
FORMAT_OK_PREFIXES = (
    "os",
    "json",
    "pathlib",
    "deepspeed",
    "moe_plugin.parallel",
    "moe_plugin.lightning.checkpoint_io",
    "moe_plugin.models",  # the DeepSpeed converter rebuilds the model (on meta) to lay out its partitions
)


@pytest.mark.parametrize("path", sorted(CONVERT.glob("*.py")), ids=lambda p: p.name)
def test_convert_imports_only_torch_and_layers(path: Path) -> None:
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        for name in names:
            is_torch = name.split(".")[0] == "torch" and "distributed" not in name
            is_ours = name.startswith(("moe_plugin.layers", "moe_plugin.convert"))
            is_format = (
                path.name in FORMAT_CONVERTERS and name.split(".")[0] != "torch" and name.startswith(FORMAT_OK_PREFIXES)
            )
            assert name in STDLIB_OK or is_torch or is_ours or is_format, f"{path.name} imports {name}"
    assert "cuda" not in path.read_text(), f"{path.name} mentions cuda"
