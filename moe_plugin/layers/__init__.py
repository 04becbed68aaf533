"""Model math, pure PyTorch: no torch.distributed, Lightning, Hydra or vendor imports here."""

from moe_plugin.layers.attention import Attention
from moe_plugin.layers.feed_forward import FeedForward
from moe_plugin.layers.moe import MoE, collect_aux_losses, moe_layers, moe_start_step
from moe_plugin.layers.norm import RMSNorm
from moe_plugin.layers.norm_head import NormHead
from moe_plugin.layers.router import RouterOutput, TopKRouter

__all__ = [
    "Attention",
    "FeedForward",
    "MoE",
    "NormHead",
    "RMSNorm",
    "RouterOutput",
    "TopKRouter",
    "collect_aux_losses",
    "moe_layers",
    "moe_start_step",
]
