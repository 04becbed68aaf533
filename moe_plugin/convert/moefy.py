"""`moefy`: turn the dense feed-forward blocks of any `nn.Module` into MoE layers, optionally upcycled.

Shapes: D hidden, F dense FFN hidden, f expert FFN hidden, E experts, K experts per token.

    model = moefy(model, num_experts=8, top_k=2, upcycle=True)

1. find:     every module that looks like an FFN (`ffn.infer_layout`: gate/up/down or up/down projections
             as its only parameterised children, or Sequential(Linear, act, Linear)), or only those whose
             qualified name fully matches `target` (a regex) or whose type is `target`
2. select:   skip the first `skip_first` matches, then convert every `every`-th one (GShard/Switch
             convert every other layer; DeepSeek keeps the first layers dense)
3. build:    an `MoE` of the same width on the same device and dtype (the meta device included); its
             experts compute the dense FFN's own function (SwiGLU -> `GroupedExperts`, anything else ->
             `GroupedMLPExperts` with the dense activation and biases)
4. upcycle:  (optional) copy the dense weights into the experts and shared experts (see upcycle.py) and
             check on random tokens that the new layer reproduces the old one
5. replace:  put the MoE where the FFN was, so the model's forward is unchanged

In the spirit of FastMoE's `fmoefy` and Megatron-Core's upcycling, but for any PyTorch model. Pure torch:
model surgery only; the Lightning glue is in moe_plugin.lightning.mixin.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moe_plugin.convert.ffn import (
    DenseFFN,
    FFNLayout,
    check_shapes,
    find_activation,
    infer_layout,
    is_projection,
    read_ffn,
)
from moe_plugin.convert.upcycle import is_swiglu, max_abs_diff, mlp_experts_for, upcycle_moe_
from moe_plugin.layers.moe import MoE

log = logging.getLogger(__name__)

# Activations tried, in order, when an FFN calls a function in its forward instead of keeping a module.
ACTIVATIONS: dict[str, nn.Module] = {
    "silu": nn.SiLU(),
    "gelu": nn.GELU(),
    "gelu_tanh": nn.GELU(approximate="tanh"),
    "relu": nn.ReLU(),
}


@dataclass
class MoefySource:
    """What a converted layer was, kept on the MoE as `moe.moefy_source` to load dense checkpoints later."""

    layout: FFNLayout
    conv1d: bool
    activation: nn.Module
    dense_type: str
    bias: bool
    moe_args: dict[str, Any]


def build_moe(source: MoefySource, device: torch.device | str, dtype: torch.dtype) -> MoE:
    """A freshly initialised MoE layer for a dense FFN described by `source` (also used to re-initialise
    a layer materialised from the meta device before upcycling it from a checkpoint)."""
    args = source.moe_args
    with torch.device(device):
        moe = MoE(**args)
        if not is_swiglu(source.layout.gated, source.activation, source.bias):
            # Keep the MoE's own SwiGLU experts (and their fast path) when they fit; else match the FFN.
            moe.experts = mlp_experts_for(
                args["num_experts"],
                args["hidden_size"],
                args["expert_hidden_size"],
                source.layout.gated,
                source.activation,
                source.bias,
                args.get("grouped_mm_backend", "auto"),
            )
    moe.to(dtype=dtype)
    moe.moefy_source = source
    return moe


def moefy(
    model: nn.Module,
    num_experts: int = 8,
    top_k: int = 2,
    expert_hidden_size: int | None = None,
    granularity: int = 1,
    num_shared_experts: int = 0,
    shared_expert_hidden_size: int | None = None,
    shared_expert_gate: bool = False,
    norm_topk_prob: bool = True,
    aux_loss_coef: float = 0.015,
    z_loss_coef: float = 1e-4,
    target: str | type | Sequence[type] | None = None,
    layout: FFNLayout | dict[str, str] | None = None,
    activation: str | nn.Module | None = None,
    every: int = 1,
    skip_first: int = 0,
    upcycle: bool = False,
    noise_std: float = 0.0,
    seed: int = 0,
    verify: bool = True,
    enabled: bool = True,
    **moe_kwargs: Any,
) -> nn.Module:
    """Replace `model`'s dense FFNs with `MoE` layers in place and return the model.

    Args:
        num_experts, top_k, num_shared_experts, shared_expert_hidden_size, shared_expert_gate,
        norm_topk_prob, aux_loss_coef, z_loss_coef, **moe_kwargs: passed to `MoE`.
        expert_hidden_size: width f of each routed expert. Default: the dense width F split evenly, i.e.
            f = (F - S) / granularity with S the shared-expert width (f = F for plain upcycling).
        granularity: G, how many fine-grained experts one copy of the dense FFN is split into when
            `expert_hidden_size` is not given.
        target: regex fully matched against qualified module names (e.g. r"layers\\.\\d+\\.mlp"), or a
            module class (or classes). Default: every module that looks like an FFN.
        layout: the projection names when they are not among the defaults, e.g.
            {"gate": "w_a", "up": "w_b", "down": "w_c"} or {"up": "fc_in", "down": "fc_out"}.
        activation: "silu", "gelu", "gelu_tanh", "relu" or a module; default: the FFN's own activation
            module, or the one that reproduces its output on random tokens.
        every, skip_first: convert matches skip_first, skip_first + every, ... (in module order).
        upcycle: initialise experts from the dense weights so the output is unchanged (upcycle.py).
        noise_std: relative noise added to upcycled experts (breaks exactness; 0 keeps it).
        seed: seeds the router initialisation and the noise.
        verify: after upcycling, check each layer against the FFN it replaces on random tokens.
        enabled: False returns the model untouched (the `moefy: none` Hydra option).

    Raises:
        ValueError: no FFN matched (the message lists candidate modules), ambiguous matches, shapes that
            cannot form an MoE layer, or upcycling on the meta device.
    """
    if not enabled:
        return model
    _check_args(num_experts, top_k, granularity, every, skip_first, noise_std)
    layout = FFNLayout(**layout) if isinstance(layout, dict) else layout
    act_override = _activation(activation)
    matches = find_ffns(model, target, layout)
    selected = [m for i, m in enumerate(matches) if i >= skip_first and (i - skip_first) % every == 0]
    if not selected:
        raise ValueError(
            f"moefy: skip_first={skip_first} skips all {len(matches)} matched FFNs "
            f"({[n for n, _, _ in matches][:5]}...); use skip_first < {len(matches)}."
        )
    generator = torch.Generator().manual_seed(seed)
    dense_params = sum(p.numel() for p in model.parameters())

    for name, module, lay in selected:
        D, F = check_shapes(name, module, lay)
        weight = dict(module.named_children())[lay.up].weight
        on_meta = weight.device.type == "meta"
        if upcycle and on_meta:
            raise ValueError(
                f"moefy(upcycle=True): '{name}' is on the meta device, so there are no dense weights to copy. "
                "Convert with upcycle=False, materialise the model (model.to_empty(device=...)), then call "
                "moe_plugin.convert.load_dense_state_dict(model, dense_state_dict)."
            )
        act = act_override or find_activation(module, lay) or _probe_activation(name, module, lay, on_meta)
        has_bias = any(getattr(dict(module.named_children())[n], "bias", None) is not None for n in lay.names())
        f, shared_f = _expert_sizes(
            name, F, expert_hidden_size, granularity, num_shared_experts, shared_expert_hidden_size
        )
        moe_args = dict(
            hidden_size=D,
            num_experts=num_experts,
            top_k=top_k,
            expert_hidden_size=f,
            num_shared_experts=num_shared_experts,
            shared_expert_hidden_size=shared_f,
            shared_expert_gate=shared_expert_gate,
            norm_topk_prob=norm_topk_prob,
            aux_loss_coef=aux_loss_coef,
            z_loss_coef=z_loss_coef,
            **moe_kwargs,
        )
        source = MoefySource(lay, _is_conv1d_layout(module, lay), act, type(module).__name__, has_bias, moe_args)
        moe = build_moe(source, weight.device, weight.dtype)
        moe.train(module.training)
        if upcycle:
            upcycle_moe_(moe, read_ffn(module, lay, act), noise_std=noise_std, generator=generator, name=name)
            # Noise, no renormalisation or token dropping make the start inexact by design (and warn).
            if verify and noise_std == 0 and norm_topk_prob and moe_kwargs.get("capacity_factor") is None:
                _verify(name, module, moe)
        model = _replace(model, name, moe)
    log.info("%s", summary(model, [n for n, _, _ in selected], dense_params, upcycle))
    return model


def summary(model: nn.Module, names: list[str], dense_params: int, upcycled: bool) -> str:
    """One line for the log: what was converted and the parameter counts (total, and active per token)."""
    moes = [model.get_submodule(n) if n else model for n in names]
    total = sum(p.numel() for p in model.parameters())
    expert = sum(p.numel() for m in moes for p in m.experts.parameters())
    active = (
        total - expert + sum(m.top_k * sum(p.numel() for p in m.experts.parameters()) // m.num_experts for m in moes)
    )
    m0 = moes[0]
    return (
        f"moefy: {len(moes)} FFNs -> MoE ({m0.num_experts} experts, top-{m0.top_k}, expert width "
        f"{m0.experts.ffn_hidden_size}{', upcycled' if upcycled else ''}): {names[0]!r}"
        f"{f' ... {names[-1]!r}' if len(names) > 1 else ''}; parameters {dense_params:,} -> {total:,} total, "
        f"{active:,} active per token"
    )


def find_ffns(
    model: nn.Module, target: str | type | Sequence[type] | None = None, layout: FFNLayout | None = None
) -> list[tuple[str, nn.Module, FFNLayout]]:
    """(qualified name, module, layout) of every FFN to convert, in module order; ValueError if none or ambiguous."""
    pattern = re.compile(target) if isinstance(target, str) else None
    types = _types(target)
    matches: list[tuple[str, nn.Module, FFNLayout]] = []
    moe_names: list[str] = []
    for name, module in model.named_modules(remove_duplicate=False):
        # Inside an FFN already matched (its own projections) or inside an MoE layer (its shared experts
        # are an FFN too, but already part of an MoE): nothing to convert.
        if isinstance(module, MoE):
            moe_names.append(name)
            continue
        if any(name.startswith(n + "." if n else "") for n in [*moe_names, *(m[0] for m in matches)]):
            continue
        named = (pattern is not None and pattern.fullmatch(name)) or (types and isinstance(module, types))
        if target is not None and not named:
            continue
        layouts = infer_layout(module, layout)
        if len(layouts) > 1:
            raise ValueError(
                f"moefy: module '{name}' ({type(module).__name__}) matches several FFN layouts: "
                f"{[lay.names() for lay in layouts]}. Pass layout= with the gate/up/down child names to use."
            )
        if layouts and (target is not None or _shapes_chain(name, module, layouts[0])):
            matches.append((name, module, layouts[0]))
        elif target is not None:
            children = {n: type(c).__name__ for n, c in module.named_children()}
            raise ValueError(
                f"moefy: module '{name}' matches target={_describe(target)} but is not a feed-forward block "
                f"moefy can read: its children are {children}. moefy needs gate/up/down or up/down projections "
                "(nn.Linear or Conv1D) as its only children with parameters; narrow target= to the FFN itself, "
                "or pass layout={'gate': ..., 'up': ..., 'down': ...} naming them."
            )
    _check_nesting(matches)
    kinds = sorted({type(m).__name__ for _, m, _ in matches})
    if target is None and len(kinds) > 1:
        by_kind = {k: [n for n, m, _ in matches if type(m).__name__ == k] for k in kinds}
        raise ValueError(
            f"moefy: the default layouts match feed-forward blocks of {len(kinds)} kinds, so which ones to convert "
            f"is ambiguous: {by_kind}. Pass target=<the class to convert> or target='<regex of their names>'."
        )
    if not matches:
        raise ValueError(
            f"moefy: no feed-forward block matched {_describe(target) if target is not None else 'the default layouts'}"
            f"{'' if layout is None else f' with layout={layout}'}. Candidate modules (two or more projections "
            f"among their children): {candidate_names(model)}. Pass target='<regex of their qualified names>' "
            "or target=<YourMLPClass>, and layout={...} if their projections have other names."
        )
    return matches


def _shapes_chain(name: str, module: nn.Module, layout: FFNLayout) -> bool:
    """Whether a default match maps D -> F -> D; a D -> F -> classes head is not an FFN to convert."""
    try:
        check_shapes(name, module, layout)
    except ValueError:
        return False
    return True


def candidate_names(model: nn.Module, limit: int = 20) -> list[str]:
    """Modules that hold two or more projections directly: where an FFN would be."""
    names = []
    for name, module in model.named_modules():
        if sum(is_projection(c) for c in module.children()) >= 2:
            names.append(name or "<root>")
    return names[:limit] + ([f"... {len(names) - limit} more"] if len(names) > limit else [])


def _check_nesting(matches: list[tuple[str, nn.Module, FFNLayout]]) -> None:
    ids = {id(m): n for n, m, _ in matches}
    if len(ids) != len(matches):
        seen: dict[int, str] = {}
        for n, m, _ in matches:
            if id(m) in seen:
                raise ValueError(
                    f"moefy: the same FFN module is reachable as '{seen[id(m)]}' and '{n}' (shared weights). "
                    "Converting it would tie the MoE layers too; give each block its own FFN or narrow target=."
                )
            seen[id(m)] = n


def _describe(target: object) -> str:
    if isinstance(target, str):
        return f"pattern '{target}'"
    return f"type {[t.__name__ for t in _types(target)]}"


def _types(target: object) -> tuple[type, ...]:
    if isinstance(target, type):
        return (target,)
    if isinstance(target, Sequence) and not isinstance(target, str):
        return tuple(t for t in target if isinstance(t, type))
    return ()


def _activation(activation: str | nn.Module | None) -> nn.Module | None:
    if activation is None or isinstance(activation, nn.Module):
        return activation
    if activation not in ACTIVATIONS:
        raise ValueError(f"moefy: activation={activation!r} is unknown; use one of {sorted(ACTIVATIONS)} or a module.")
    return ACTIVATIONS[activation]


@torch.no_grad()
def _probe_activation(name: str, module: nn.Module, layout: FFNLayout, on_meta: bool) -> nn.Module:
    """The activation that makes down(act(...)) reproduce the FFN's forward on random tokens.

    On the meta device there is nothing to probe: SiLU for a gated FFN, GELU for a two-layer one.
    """
    if on_meta:
        # No weights to probe with: the usual choice per shape (SwiGLU for gated FFNs, GELU otherwise).
        return ACTIVATIONS["silu"] if layout.gated else ACTIVATIONS["gelu"]
    if not on_meta:
        D, _ = check_shapes(name, module, layout)
        dense = read_ffn(module, layout)
        p = dense.w_up_DF
        x = torch.randn(8, D, generator=torch.Generator().manual_seed(0)).to(device=p.device, dtype=p.dtype)
        was_training = module.training
        module.eval()
        ref = module(x)
        module.train(was_training)
        for act in ACTIVATIONS.values():
            dense.activation = act
            if torch.allclose(dense_forward(dense, x), ref, rtol=1e-4, atol=1e-5):
                return act
    raise ValueError(
        f"moefy: cannot tell the activation of '{name}' ({type(module).__name__}): it keeps no activation module "
        f"and none of {sorted(ACTIVATIONS)} reproduces its output. "
        "Pass activation='silu' | 'gelu' | 'gelu_tanh' | 'relu' or an nn.Module."
    )


def dense_forward(dense: DenseFFN, x: torch.Tensor) -> torch.Tensor:
    """down(act(gate(x)) * up(x)) or down(act(up(x))) from a DenseFFN's weights: the reference."""
    act = dense.activation or nn.SiLU()
    up = x @ dense.w_up_DF + (dense.b_up_F if dense.b_up_F is not None else 0)
    if dense.w_gate_DF is not None:
        h = act(x @ dense.w_gate_DF + (dense.b_gate_F if dense.b_gate_F is not None else 0)) * up
    else:
        h = act(up)
    return h @ dense.w_down_FD + (dense.b_down_D if dense.b_down_D is not None else 0)


def _verify(name: str, module: nn.Module, moe: MoE) -> None:
    diff, scale = max_abs_diff(module, moe)
    tol = (1e-5 if moe.router.weight.dtype == torch.float64 else 1e-4) * max(1.0, scale)
    if next(moe.parameters()).dtype in (torch.float16, torch.bfloat16):
        tol = 2e-2 * max(1.0, scale)
    if diff > tol:
        raise ValueError(
            f"moefy(upcycle=True): the MoE built for '{name}' ({type(module).__name__}) differs from it by {diff:.3g} "
            f"(output scale {scale:.3g}) on random tokens, so its forward is not down(act(...)) as read: it may "
            "add a residual, scale its output or use another activation. Pass activation=..., point target= at "
            "the plain FFN, or set verify=False if the difference is intended."
        )


def _expert_sizes(
    name: str, F: int, f: int | None, G: int, n_shared: int, shared_f: int | None
) -> tuple[int, int | None]:
    if f is not None:
        return f, shared_f
    if shared_f is None:
        # F = (n_shared + G) * f: every shared and routed expert one equal segment of the dense FFN.
        parts = n_shared + G
        if F % parts:
            raise ValueError(
                f"moefy: '{name}' has dense FFN width {F}, which does not split into num_shared_experts + "
                f"granularity = {parts} equal experts. Pass expert_hidden_size= explicitly."
            )
        return F // parts, None
    rest = F - n_shared * shared_f
    if rest <= 0 or rest % G:
        raise ValueError(
            f"moefy: '{name}' has dense FFN width {F}; after {n_shared} shared experts of {shared_f} the remaining "
            f"{rest} does not split into granularity={G} experts. Pass expert_hidden_size= explicitly."
        )
    return rest // G, shared_f


def _is_conv1d_layout(module: nn.Module, layout: FFNLayout) -> bool:
    return not isinstance(dict(module.named_children())[layout.up], nn.Linear)


def _replace(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    if name == "":
        return new
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)
    return model


def _check_args(num_experts: int, top_k: int, granularity: int, every: int, skip_first: int, noise_std: float) -> None:
    checks = [
        (num_experts >= 1, f"num_experts={num_experts} must be >= 1"),
        (1 <= top_k <= num_experts, f"top_k={top_k} must be between 1 and num_experts={num_experts}"),
        (granularity >= 1, f"granularity={granularity} must be >= 1"),
        (every >= 1, f"every={every} must be >= 1 (1 converts every FFN, 2 every other one)"),
        (skip_first >= 0, f"skip_first={skip_first} must be >= 0"),
        (noise_std >= 0, f"noise_std={noise_std} must be >= 0 (0 keeps the upcycled output exact)"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ValueError(f"moefy: {msg}.")
