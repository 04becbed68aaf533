"""Lightning callbacks shipped with the plugin (glue only; the math lives in moe_plugin.layers)."""

from moe_plugin.lightning.callbacks.expert_load import ExpertLoad
from moe_plugin.lightning.callbacks.router_updates import RouterUpdates

__all__ = ["ExpertLoad", "RouterUpdates"]
