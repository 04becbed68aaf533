"""apply_sharded_data_parallel(module, mesh): FSDP2 over the dense part and the experts, expert-parallel aware.

Vocabulary (mesh.py): W world, EP expert-parallel size, DP = W / EP, S dense shard size, R = W / S,
ES expert shard size, ER = DP / ES. Applied after apply_expert_parallel (experts already sliced by id).

What is wrapped, innermost first (torchtitan's order, FSDP2's `fully_shard`; no sharding engine here):

    every MoE layer's experts   fully_shard(mesh = (ER, ES) of this rank's ep coordinate)   "efsdp"
    every decoder block          fully_shard(mesh = (R, S))                                  HSDP when R > 1
    the embedding, the head      fully_shard((R, S)) each (children of the root with >= 64K parameters,
                                 untied): whole only while used, not for the root's whole step
    the root                     fully_shard((R, S)); for a LightningModule (children_as_roots) each child
                                 holding parameters, e.g. its `model`, is a root

Gradients (the rule of grads.py, now done by FSDP's reduce-scatter / all-reduce):

    dense  theta: grad = (1/W) sum_r dL_r/dtheta          FSDP's default: the mean over its R x S = W ranks
    expert phi:   grad = (1/W) sum_{DP replicas} local_grad  FSDP sums over ER x ES = DP ranks; the divide
                                                             factor is set to W instead of DP

so that any (EP, S) gives the single-process gradient of the same global batch (tested in
tests/distributed/test_sharded_training.py). Experts are sharded on dim 0 (whole experts per rank) when
each rank of the expert shard group gets at least one, else on dim 1 (torchtitan's shard_placement_fn:
no empty shards).

Mixed precision (FSDP2's MixedPrecisionPolicy, from trainer.precision): parameters are all-gathered in
bf16/fp16 for compute, gradients reduced in fp32, the sharded fp32 parameters are the master weights.
`offload_optimizer`: FSDP2's CPUOffloadPolicy, the sharded parameters, their gradients and therefore the
optimizer state live in host memory; the step runs on the host (on a CPU-only machine it changes nothing).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import Shard

from moe_plugin.layers.moe import moe_layers
from moe_plugin.parallel.fsdp_comms import custom_comms
from moe_plugin.parallel.mesh import ExpertParallelMesh

# trainer.precision -> dtype of the parameters used for compute (None: full precision, no policy)
_PARAM_DTYPES: dict[str, torch.dtype | None] = {
    "32": None,
    "32-true": None,
    "64-true": None,
    "bf16-mixed": torch.bfloat16,
    "bf16-true": torch.bfloat16,
    "bf16": torch.bfloat16,
    "16-mixed": torch.float16,
    "16-true": torch.float16,
    "16": torch.float16,
}


def mixed_precision_policy(precision: str | int | None) -> MixedPrecisionPolicy:
    """FSDP2 policy for `trainer.precision`: low-precision compute, fp32 reduction, fp32 master (sharded) weights."""
    key = str(precision) if precision is not None else "32"
    if key not in _PARAM_DTYPES:
        raise ValueError(
            f"trainer.precision={precision!r} is not supported with strategy.data_parallel_shard_size > 1. "
            f"Use one of {sorted(_PARAM_DTYPES)}."
        )
    dtype = _PARAM_DTYPES[key]
    if dtype is None:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


@dataclass
class ShardingPlan:
    """What apply_sharded_data_parallel wrapped (names relative to the module passed in)."""

    mesh: ExpertParallelMesh
    expert_modules: list[str] = field(default_factory=list)
    blocks: list[str] = field(default_factory=list)
    edges: list[str] = field(default_factory=list)  # embedding / head units of their own
    roots: list[str] = field(default_factory=list)


# a root's child this large (the embedding, the head) becomes an FSDP unit of its own; smaller ones (the final
# norm) stay with the root: one more collective each would cost more than the memory it frees
EDGE_MIN_PARAMS = 1 << 16


def decoder_blocks(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """The repeated blocks: elements of every nn.ModuleList that hold parameters (model.layers[i], ...)."""
    out = []
    for name, m in module.named_modules():
        if isinstance(m, nn.ModuleList):
            for i, child in enumerate(m):
                if any(True for _ in child.parameters()):
                    out.append((f"{name}.{i}" if name else str(i), child))
    # nested ModuleLists (a block holding a list): keep the outermost only
    names = [n for n, _ in out]
    return [(n, m) for n, m in out if not any(n != o and n.startswith(o + ".") for o in names)]


def _expert_placement(expert_shard_size: int) -> object:
    def placement(p: nn.Parameter) -> Shard:
        # whole experts per rank when there are enough of them, else split each expert's rows
        return Shard(0) if p.shape[0] >= expert_shard_size else Shard(1)

    return placement


def apply_sharded_data_parallel(
    module: nn.Module,
    mesh: ExpertParallelMesh,
    precision: str | int | None = None,
    offload_optimizer: bool = False,
    reshard_after_forward: bool = True,
    children_as_roots: bool = False,
    comms: str = "auto",
) -> ShardingPlan:
    """fully_shard the experts, the blocks and the root(s) of `module` in place (idempotent).

    children_as_roots: `module` is not called itself (a LightningModule, whose training_step calls
    self.model): each child holding parameters becomes a root instead of `module`.
    comms: "auto" (point-to-point all-gather / reduce-scatter on gloo, fsdp_comms.py), "native", "p2p" or
    "all_reduce".
    """
    if not mesh.sharded:
        raise ValueError("apply_sharded_data_parallel needs strategy.data_parallel_shard_size > 1.")
    assert mesh.dense_mesh is not None
    plan = ShardingPlan(mesh)
    mp = mixed_precision_policy(precision)
    offload: OffloadPolicy = CPUOffloadPolicy(pin_memory=False) if offload_optimizer else OffloadPolicy()
    names = {id(m): n for n, m in module.named_modules()}
    expert_mesh = mesh.expert_fsdp_mesh()
    comm_pair = custom_comms(comms, mesh.dense_mesh.get_group("dp_shard"))

    def shard(m: nn.Module, **kwargs: object) -> None:
        fully_shard(m, mp_policy=mp, offload_policy=offload, **kwargs)  # type: ignore[arg-type]
        if comm_pair is not None:
            m.set_custom_all_gather(comm_pair[0])  # type: ignore[operator]
            m.set_custom_reduce_scatter(comm_pair[1])  # type: ignore[operator]

    layers = moe_layers(module)
    for j, layer in enumerate(layers):
        experts = layer.experts
        plan.expert_modules.append(names[id(experts)])
        if isinstance(experts, FSDPModule):
            continue
        shard(
            experts,
            mesh=expert_mesh,
            reshard_after_forward=reshard_after_forward and j < len(layers) - 1,
            shard_placement_fn=_expert_placement(mesh.expert_shard_size),
        )
        # FSDP divides by its own group size DP; the expert rule divides the DP-sum by W (see above). Sum, then
        # divide: a factor other than the shard group's size would otherwise need NCCL's PREMUL_SUM (gloo has none)
        experts.set_gradient_divide_factor(float(mesh.world_size))  # type: ignore[attr-defined]
        # Only when the experts' reduce-scatter group has more than one rank: with ES = 1 torch 2.13 divides the
        # copied gradient by the factor AND post-divides it again under force-sum (W^2), and needs no PREMUL_SUM.
        if mesh.expert_shard_size > 1:
            experts.set_force_sum_reduction_for_comms(True)  # type: ignore[attr-defined]
    blocks = decoder_blocks(module)
    for i, (name, block) in enumerate(blocks):
        plan.blocks.append(name)
        if not isinstance(block, FSDPModule):
            shard(
                block,
                mesh=mesh.dense_mesh,
                # the last block is the first one backward needs: resharding it after forward would only add
                # an all-gather (torchtitan keeps it unsharded too); its experts likewise
                reshard_after_forward=reshard_after_forward and i < len(blocks) - 1,
            )

    def edges(root: nn.Module, prefix: str) -> None:
        """The root's large leaf children (input embedding, output head) as units of their own (torchtitan's
        tok_embeddings and output): the embedding is resharded after forward and the head after its backward,
        instead of both staying whole until the root's backward ends."""
        shared = _shared_parameter_ids(root)
        for name, child in root.named_children():
            params = list(child.parameters())
            if (
                isinstance(child, (FSDPModule, nn.ModuleList, nn.ModuleDict))
                or sum(p.numel() for p in params) < EDGE_MIN_PARAMS
                or any(isinstance(m, FSDPModule) for m in child.modules())  # holds blocks or experts
                or any(id(p) in shared for p in params)  # tied embedding and head: one unit (the root)
            ):
                continue
            plan.edges.append(f"{prefix}{name}")
            # the embedding is not used again until the end of backward; the head is the first thing backward needs
            shard(child, mesh=mesh.dense_mesh, reshard_after_forward=reshard_after_forward and _is_input(child))

    if not children_as_roots:
        plan.roots.append("")
        edges(module, "")
        if not isinstance(module, FSDPModule):
            # the root: its forward starts FSDP's lazy init and queues the end-of-backward wait
            shard(module, mesh=mesh.dense_mesh, reshard_after_forward=False)
        return plan
    if any(True for _ in module.parameters(recurse=False)):
        raise ValueError(
            f"{type(module).__name__} holds parameters directly (not in a submodule); sharded data parallelism "
            "wraps its children. Move them into a submodule (e.g. self.model) or use data_parallel_shard_size=1."
        )
    for name, child in module.named_children():
        if not any(True for _ in child.parameters()) or isinstance(child, FSDPModule):
            continue
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
            raise ValueError(
                f"{type(module).__name__}.{name} is a {type(child).__name__} holding parameters; sharded data "
                "parallelism needs the LightningModule's parameters inside modules it calls (e.g. self.model)."
            )
        plan.roots.append(name)
        edges(child, f"{name}.")
        shard(child, mesh=mesh.dense_mesh, reshard_after_forward=False)
    return plan


def _is_input(module: nn.Module) -> bool:
    return isinstance(module, nn.Embedding)


def _shared_parameter_ids(root: nn.Module) -> set[int]:
    """ids of parameters that two direct children of `root` both hold (tied weights)."""
    seen: dict[int, str] = {}
    shared: set[int] = set()
    for name, child in root.named_children():
        for p in child.parameters():
            if seen.setdefault(id(p), name) != name:
                shared.add(id(p))
    return shared


def is_sharded(module: nn.Module) -> bool:
    """True when some submodule of `module` is managed by FSDP2."""
    return any(isinstance(m, FSDPModule) for m in module.modules())
