"""Load a dense checkpoint into a model converted by `moefy`: upcycling from a state dict.

The converted model's non-FFN keys are the dense model's keys, unchanged. Each MoE layer that `moefy`
made keeps, in `moe.moefy_source`, the layout of the FFN it replaced, so the dense FFN's keys under the
same prefix (e.g. "layers.0.mlp.gate_proj.weight") are read and upcycled into it (upcycle.py). This is
the path for models too large to build densely first: build on the meta device, `moefy(...)`,
`to_empty(device=...)`, then `load_dense_state_dict(model, torch.load(dense_ckpt, weights_only=True))`.
"""

from __future__ import annotations

import torch
from torch import nn

from moe_plugin.convert.ffn import dense_ffn_from_state_dict, dense_keys
from moe_plugin.convert.moefy import MoefySource, build_moe
from moe_plugin.convert.upcycle import upcycle_moe_
from moe_plugin.layers.moe import MoE


def load_dense_state_dict(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor],
    noise_std: float = 0.0,
    seed: int = 0,
    strict: bool = True,
) -> list[str]:
    """Load `state_dict` of the dense model into the moefied `model`, upcycling every converted FFN.

    Returns the names of the MoE layers that were upcycled. With `strict`, a key the converted model does
    not have, or a model key the checkpoint does not provide (outside the upcycled MoE layers), raises a
    KeyError listing them.
    """
    if any(p.device.type == "meta" for p in model.parameters()):
        raise ValueError(
            "load_dense_state_dict: the model still has parameters on the meta device; call "
            "model.to_empty(device=...) first, then load."
        )
    moes = [(n, m) for n, m in model.named_modules() if isinstance(m, MoE) and hasattr(m, "moefy_source")]
    rest = dict(state_dict)
    for name, _ in moes:
        src = _source(model, name)
        for k in dense_keys(f"{name}.", src.layout, state_dict):
            rest.pop(k)
    result = model.load_state_dict(rest, strict=False)
    if strict:
        moe_prefixes = tuple(f"{n}." for n, _ in moes)
        missing = [k for k in result.missing_keys if not k.startswith(moe_prefixes)]
        if missing or result.unexpected_keys:
            raise KeyError(
                f"load_dense_state_dict: missing keys {missing[:10]}, unexpected keys {result.unexpected_keys[:10]}. "
                "Is this the checkpoint of the same dense model, with the same key prefix (a LightningModule's "
                "state_dict has its attribute names first)? Pass strict=False to load what matches."
            )
    generator = torch.Generator().manual_seed(seed)
    for name, moe in moes:
        src = _source(model, name)
        # Every buffer and parameter of the layer gets a proper initial value first (after to_empty they
        # hold whatever was in memory: router statistics, expert bias, biases the dense FFN lacks), then the
        # upcycled weights overwrite the experts, shared experts and router.
        p = next(moe.parameters())
        moe.load_state_dict(build_moe(src, p.device, p.dtype).state_dict())
        dense = dense_ffn_from_state_dict(state_dict, f"{name}.", src.layout, src.conv1d, src.activation)
        upcycle_moe_(moe, dense, noise_std=noise_std, generator=generator, name=name)
    return [n for n, _ in moes]


def _source(model: nn.Module, name: str) -> MoefySource:
    return model.get_submodule(name).moefy_source
