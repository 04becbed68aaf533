"""moe_plugin: Mixture-of-Experts training with expert parallelism for PyTorch Lightning."""

from moe_plugin.layers.moe import MoE, collect_aux_losses
from moe_plugin.lightning.strategy import ExpertParallelStrategy
from moe_plugin.lightning.strategy import register as _register_strategy

_register_strategy()  # Trainer(strategy="expert_parallel")

__version__ = "0.1.0"

__all__ = ["ExpertParallelStrategy", "MoE", "collect_aux_losses", "__version__"]
