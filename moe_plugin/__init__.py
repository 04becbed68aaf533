"""moe_plugin: Mixture-of-Experts training with expert parallelism for PyTorch Lightning."""

from moe_plugin.config.resolvers import register_resolvers
from moe_plugin.layers.moe import MoE, collect_aux_losses

register_resolvers()  # ${moe_run_id:...} in conf/hydra/default.yaml

__version__ = "0.1.0"

__all__ = ["MoE", "collect_aux_losses", "__version__"]
