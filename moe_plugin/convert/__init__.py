"""Model surgery, pure torch: turn a dense model's FFNs into MoE layers (`moefy`) and upcycle them."""

from moe_plugin.convert.checkpoint import load_dense_state_dict
from moe_plugin.convert.ffn import DenseFFN, FFNLayout
from moe_plugin.convert.moefy import find_ffns, moefy
from moe_plugin.convert.upcycle import upcycle_moe_

__all__ = ["DenseFFN", "FFNLayout", "find_ffns", "load_dense_state_dict", "moefy", "upcycle_moe_"]
