"""moe_plugin: Mixture-of-Experts training with expert parallelism for PyTorch Lightning."""

from moe_plugin.convert import moefy
from moe_plugin.layers.moe import MoE, collect_aux_losses

__version__ = "0.1.0"

__all__ = ["MoE", "collect_aux_losses", "moefy", "__version__"]
