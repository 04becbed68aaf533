"""DeepSpeed's engine told about OUR MoE layers: `initialize_expert_parallel_engine`.

DeepSpeed switches its expert handling on (`engine.has_moe_layers`) only when it finds its own MoE
module classes (deepspeed.moe.layer.MoE, AutoEP layers). Everything it then does is driven by
parameter attributes and group names, not by those classes:

    ZeRO-1/2   experts in 'moe' optimizer groups (split_moe_param_groups), partitioned over the
               expert-data group; bucket gradients divided by W, then summed over the expert-data group
               (stage_1_and_2.average_tensor), so grad(phi) = (1/W) sum_{edp} local_grad(phi): our rule
               (parallel/grads.py). Norm for clipping: partition norms summed over all W ranks, each
               expert counted once.
    ZeRO-3     parameters with ds_zero_placement_family = "autoep_expert" are partitioned over the
               expert-data group and their gradients averaged by W (stage3._gradient_averaging_world_size).
               Every MoE layer is a ZeRO-3 "leaf" (deepspeed.utils.set_z3_leaf_module): its router, experts
               and shared experts are gathered together when the layer's forward (and, through its output,
               its backward) starts, and released when it ends. Without this ZeRO-3 cannot train our layers:
               ZeRO-3 re-gathers a module's parameters for backward through hooks on the module's OUTPUT
               tensors, found by walking tuples/lists/dicts, and the router returns a RouterOutput dataclass
               it cannot walk ("A module has unknown inputs or outputs type"), so the router weight stayed
               partitioned (shape [0]) in backward and AccumulateGrad failed ("size of tensor a (0) must match
               the size of tensor b (D)"). DeepSpeed recommends leaf modules for MoE blocks anyway (their
               expert order changes every step, which defeats ZeRO-3's trace-based prefetch).

So `ExpertParallelEngine` is DeepSpeedEngine with `has_moe_layers` switched on for our layers and the
ZeRO-3 check that insists on DeepSpeed's AutoEP layer classes relaxed to "every expert parameter carries
DeepSpeed's expert placement". The routing and the token exchange stay ours (AllToAllDispatcher);
DeepSpeed does not see a MoE layer object at all.

`initialize_expert_parallel_engine` is `deepspeed.initialize` (same steps: shut down zero.Init,
DeepSpeedConfig, optimizer flags, engine, restore zero.Init) building this engine class.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torch import nn

from moe_plugin.layers.moe import moe_layers
from moe_plugin.parallel.deepspeed_groups import EXPERT_PLACEMENT_FAMILY


def _engine_class() -> type:
    from deepspeed.moe.utils import is_moe_param
    from deepspeed.runtime.engine import DeepSpeedEngine

    class ExpertParallelEngine(DeepSpeedEngine):  # type: ignore[misc, valid-type]
        """DeepSpeedEngine whose expert handling is on for moe_plugin's MoE layers (see module docstring)."""

        def _configure_distributed_model(self, model: nn.Module) -> None:
            layers = moe_layers(model)
            if layers:
                if not any(is_moe_param(p) for p in model.parameters()):
                    raise RuntimeError(
                        "the model has moe_plugin MoE layers but no parameter is marked as a DeepSpeed expert "
                        "parameter: call parallel.deepspeed_groups.mark_expert_parameters first."
                    )
                self.has_moe_layers = True
                self.num_experts.extend(m.num_experts for m in layers)
            super()._configure_distributed_model(model)

        def _validate_zero3_moe_compatibility(self) -> None:
            if not self.has_moe_layers:
                return
            unplaced = [
                n
                for n, p in self.module.named_parameters()
                if is_moe_param(p) and getattr(p, "ds_zero_placement_family", None) != EXPERT_PLACEMENT_FAMILY
            ]
            if unplaced:
                raise RuntimeError(
                    f"ZeRO-3 with expert parallelism: expert parameters {unplaced[:3]} have no ZeRO-3 expert placement "
                    "(mark_expert_parameters(..., zero_stage=3) sets it)."
                )
            if self.sequence_parallel_size != 1:
                raise RuntimeError("ZeRO-3 with expert parallelism does not support sequence parallelism.")

    return ExpertParallelEngine


def mark_moe_layers_as_zero3_leaves(model: nn.Module) -> int:
    """Flag every moe_plugin MoE layer as a ZeRO-3 leaf module (see the module docstring); returns how many."""
    from deepspeed.utils import set_z3_leaf_module

    layers = moe_layers(model)
    for layer in layers:
        set_z3_leaf_module(layer, True)
    return len(layers)


def skip_next_step(optimizer: Any) -> None:
    """Make the ZeRO optimizer's next step() take DeepSpeed's own overflow path: no update, the reduced
    gradients cleared, the optimizer's step count unchanged, engine.skipped_steps + 1.

    That path is what DeepSpeed runs when fp16 gradients overflow; here it is entered on request (a loss-spike
    guard rejected the update), so a skipped step leaves weights and Adam state exactly as a plain torch
    optimizer does when every `.grad` is None (the guard's skip under expert_parallel). One-shot: the patched
    check restores itself when the step consults it.
      ZeRO-1/2  step() asks has_overflow() when check_grad_overflow is set: both are set for one call.
      ZeRO-3    step() asks _overflow_check_and_loss_scale_update() (fp16 only checks): it reports overflow once
                and runs DeepSpeed's clean-up (_loss_scale_update_and_overflow_cleanup).
    """
    if hasattr(optimizer, "_overflow_check_and_loss_scale_update"):  # ZeRO-3

        def overflow_once(update_scale: bool = True) -> bool:
            del optimizer._overflow_check_and_loss_scale_update  # back to the class's method
            optimizer.overflow = True
            return optimizer._loss_scale_update_and_overflow_cleanup() if update_scale else True

        optimizer._overflow_check_and_loss_scale_update = overflow_once
        return
    if not hasattr(optimizer, "has_overflow"):
        raise RuntimeError(f"cannot skip a step of {type(optimizer).__name__}: not a DeepSpeed ZeRO optimizer.")
    had_check = optimizer.check_grad_overflow

    def has_overflow_once(*args: Any, **kwargs: Any) -> bool:
        del optimizer.has_overflow
        optimizer.check_grad_overflow = had_check
        return True

    optimizer.check_grad_overflow = True
    optimizer.has_overflow = has_overflow_once


_ENGINE: type | None = None


def expert_parallel_engine_class() -> type:
    """The ExpertParallelEngine class (built on first use: importing deepspeed takes seconds)."""
    global _ENGINE
    if _ENGINE is None:
        _ENGINE = _engine_class()
    return _ENGINE


def initialize_expert_parallel_engine(
    model: nn.Module,
    config: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
    lr_scheduler: Any = None,
    device_rank: int | None = None,
) -> tuple[Any, Any]:
    """(engine, DeepSpeed optimizer) for `model`, like deepspeed.initialize(..., dist_init_required=False)."""
    from deepspeed import set_optimizer_flags
    from deepspeed.runtime import zero
    from deepspeed.runtime.config import DeepSpeedConfig

    zero.partition_parameters.shutdown_init_context()
    config_class = DeepSpeedConfig(config, None)
    if config_class.zero_optimization_stage == 3:
        mark_moe_layers_as_zero3_leaves(model)
    set_optimizer_flags(config_class, model)
    parameters = [p for p in model.parameters() if p.requires_grad]
    engine = expert_parallel_engine_class()(
        args=argparse.Namespace(device_rank=device_rank),
        model=model,
        optimizer=optimizer,
        model_parameters=parameters,
        lr_scheduler=lr_scheduler,
        dist_init_required=False,
        config=config,
        config_class=config_class,
    )
    zero.partition_parameters.restore_init_context()
    engine._configure_python_gc()
    return engine, engine.optimizer
