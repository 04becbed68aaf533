"""moe_plugin: Mixture-of-Experts training with expert parallelism for PyTorch Lightning."""

from moe_plugin.accelerators.lightning_accelerators import register_all as _register_accelerators
from moe_plugin.config.resolvers import register_resolvers
from moe_plugin.convert import moefy
from moe_plugin.layers.moe import MoE, collect_aux_losses
from moe_plugin.lightning.strategies.deepspeed_ep import register as _register_deepspeed_ep
from moe_plugin.lightning.strategies.expert_parallel import ExpertParallelStrategy
from moe_plugin.lightning.strategies.expert_parallel import register as _register_strategy
from moe_plugin.lightning.strategies.local_sgd import register as _register_local_sgd

_register_strategy()  # Trainer(strategy="expert_parallel")
_register_local_sgd()  # Trainer(strategy="local_sgd")
_register_deepspeed_ep()  # Trainer(strategy="deepspeed_ep"); deepspeed itself is imported only when used

# Lightning has no entry-point discovery: our accelerators (npu, xpu, mlu, musa) and their
# strategies (single_<type>, ddp_<type>) are registered by name when the package is imported.
# Registration only touches the registries (no device detection, no vendor import).
_register_accelerators()
register_resolvers()  # ${moe_run_id:...} in conf/hydra/default.yaml

__version__ = "0.1.0"

__all__ = ["ExpertParallelStrategy", "MoE", "collect_aux_losses", "moefy", "__version__"]
