"""Token movement between ranks: the only place (with parallel/) that calls collectives.

The dispatcher interface and the local default live beside the layer (moe_plugin.layers.dispatcher,
since layers import nothing above them); they are re-exported here with the all-to-all implementation.
"""

from moe_plugin.dispatch.all_to_all import AllToAllDispatcher
from moe_plugin.dispatch.reduce import AllReduceSum
from moe_plugin.layers.dispatcher import LocalDispatcher, TokenDispatcher

__all__ = ["AllReduceSum", "AllToAllDispatcher", "LocalDispatcher", "TokenDispatcher"]
