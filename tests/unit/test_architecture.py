"""The architecture rules of DESIGN.md, checked by parsing imports (not by convention)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "moe_plugin"

FORBIDDEN_IN_LAYERS = (
    "torch.distributed",
    "lightning",
    "pytorch_lightning",
    "hydra",
    "omegaconf",
    "deepspeed",
    "wandb",
)
VENDOR_MODULES = ("torch_npu", "torch_mlu", "torch_musa", "intel_extension_for_pytorch", "habana_frameworks")


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def _py_files(sub: str) -> list[Path]:
    return sorted((PKG / sub).rglob("*.py"))


def _matches(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("path", _py_files("layers"), ids=lambda p: p.name)
def test_layers_import_only_torch_and_layers(path: Path) -> None:
    for name in _imports(path):
        assert not _matches(name, FORBIDDEN_IN_LAYERS + VENDOR_MODULES), f"{path.name} imports {name}"
        if name.startswith("moe_plugin"):
            # kernels/ is a leaf that layers consult (DESIGN.md): the grouped-matmul seam lives there.
            assert name.startswith(("moe_plugin.layers", "moe_plugin.kernels")), (
                f"{path.name} imports {name}: layers depend on nothing else"
            )
    source = path.read_text()
    assert '"cuda"' not in source and "'cuda'" not in source and ".cuda(" not in source, f"{path.name} says cuda"


COLLECTIVES = frozenset(
    {
        "all_reduce", "all_reduce_coalesced", "all_gather", "all_gather_object", "all_gather_into_tensor",
        "all_to_all", "all_to_all_single", "broadcast", "broadcast_object_list", "reduce", "reduce_scatter",
        "reduce_scatter_tensor", "gather", "gather_object", "scatter", "scatter_object_list", "barrier",
        "monitored_barrier", "send", "recv", "isend", "irecv", "batch_isend_irecv", "send_object_list",
        "recv_object_list",
    }
)  # fmt: skip
# modules whose functions are collectives: torch.distributed (and its c10d core, functional and autograd
# collectives) and DeepSpeed's communication package
COLLECTIVE_MODULES = (
    "torch.distributed",
    "torch.distributed.distributed_c10d",
    "torch.distributed._functional_collectives",
    "torch.distributed.nn",
    "torch.distributed.nn.functional",
    "deepspeed.comm",
)
COLLECTIVE_FOLDERS = ("dispatch", "parallel")


def collective_calls(source: str) -> list[str]:
    """Collective calls in `source`: `dist.all_reduce(...)`, `torch.distributed.barrier(...)`, a collective
    imported by name (`from torch.distributed import all_reduce`), `deepspeed.comm.X(...)`, under any alias."""
    tree = ast.parse(source)
    aliases = set(COLLECTIVE_MODULES)  # names bound to a collective module
    named: dict[str, str] = {}  # local name -> collective function imported by name
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in COLLECTIVE_MODULES and a.asname:
                    aliases.add(a.asname)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                full = f"{node.module}.{a.name}"
                if full in COLLECTIVE_MODULES:
                    aliases.add(a.asname or a.name)
                elif node.module in COLLECTIVE_MODULES and a.name in COLLECTIVES:
                    named[a.asname or a.name] = full
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Attribute) and f.attr in COLLECTIVES and ast.unparse(f.value) in aliases:
            found.append(f"line {node.lineno}: {ast.unparse(f)}")
        elif isinstance(f, ast.Name) and f.id in named:
            found.append(f"line {node.lineno}: {named[f.id]}")
    return found


def test_collective_finder_catches_every_spelling() -> None:
    src = """
import torch
import torch.distributed as dist
import torch.distributed as tdist
from torch import distributed as d2
from torch.distributed import all_gather as ag, barrier
import deepspeed.comm as dcomm
from deepspeed import comm
dist.all_reduce(t)
tdist.broadcast(t, 0)
d2.reduce_scatter_tensor(a, b)
torch.distributed.all_to_all_single(a, b)
ag([a], b)
barrier()
dcomm.all_reduce(t)
comm.barrier()
torch.distributed.distributed_c10d.broadcast(t, 0)
trainer.strategy.reduce(t)      # Lightning's API: not a torch collective call
dist.is_initialized()
dist.get_world_size()
"""
    assert len(collective_calls(src)) == 9, collective_calls(src)


def test_collectives_only_in_dispatch_and_parallel() -> None:
    """DESIGN.md: collectives only in dispatch/ and parallel/; the rest of the package calls their helpers
    (e.g. parallel/consensus.py for callbacks and strategies)."""
    offenders = []
    for path in PKG.rglob("*.py"):
        if path.relative_to(PKG).parts[0] in COLLECTIVE_FOLDERS:
            continue
        offenders += [f"{path.relative_to(PKG)} {c}" for c in collective_calls(path.read_text())]
    assert not offenders, offenders


def test_vendor_imports_only_in_accelerators_and_kernels() -> None:
    offenders = []
    for path in PKG.rglob("*.py"):
        top = path.relative_to(PKG).parts[0]
        if top in ("accelerators", "kernels"):
            continue
        offenders += [f"{path.relative_to(PKG)}: {n}" for n in _imports(path) if _matches(n, VENDOR_MODULES)]
    assert not offenders, offenders


def test_layers_do_not_import_upwards() -> None:
    for path in _py_files("dispatch"):
        for name in _imports(path):
            assert not _matches(name, ("moe_plugin.lightning", "moe_plugin.parallel", "lightning")), (path, name)


@pytest.mark.parametrize("path", _py_files("kernels"), ids=lambda p: p.name)
def test_kernels_are_leaves(path: Path) -> None:
    for name in _imports(path):
        assert not _matches(name, FORBIDDEN_IN_LAYERS), f"kernels/{path.name} imports {name}"
        if name.startswith("moe_plugin"):
            assert name.startswith("moe_plugin.kernels"), f"kernels/{path.name} imports {name}: kernels are leaves"


def test_every_torch_load_is_weights_only() -> None:
    """A checkpoint must never run code: each torch.load call in the package passes weights_only=True."""
    offenders = []
    for path in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                kw = {k.arg: k.value for k in node.keywords}
                ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                if not ok:
                    offenders.append(f"{path.relative_to(PKG)}:{node.lineno}")
    assert not offenders, f"torch.load without weights_only=True: {offenders}"


def test_config_does_not_import_lightning_glue() -> None:
    """Dependencies point one way: lightning/ (run, trainer, resume) uses config/ validation, never the reverse."""
    offenders = [
        f"{p.relative_to(PKG)}: {n}"
        for p in _py_files("config")
        for n in _imports(p)
        if _matches(n, ("moe_plugin.lightning",))
    ]
    assert not offenders, offenders


def test_errors_module_is_a_leaf() -> None:
    """moe_plugin/errors.py is imported by every package, so it imports only the standard library."""
    names = _imports(PKG / "errors.py")
    assert all(not n.startswith(("moe_plugin", "torch", "lightning")) for n in names), names
