"""Token movement between ranks: the only place (with parallel/) that calls collectives."""

from moe_plugin.dispatch.all_to_all import AllToAllDispatcher
from moe_plugin.dispatch.base import TokenDispatcher
from moe_plugin.dispatch.local import LocalDispatcher
from moe_plugin.dispatch.reduce import AllReduceSum

__all__ = ["AllReduceSum", "AllToAllDispatcher", "LocalDispatcher", "TokenDispatcher"]
