"""Recognise a dense feed-forward block and read its weights, whatever the model's own naming.

Shapes: D hidden (model width), F dense FFN hidden.

A dense FFN is described by a `FFNLayout`: which child projections it has and what they are called.

    gated (SwiGLU/GeGLU):  y = down(act(gate(x)) * up(x))      Llama/Mistral/Qwen/Gemma, Meta's w1/w3/w2
    fused gate|up:         g, u = gate_up(x).chunk(2); y = down(act(g) * u)           Phi-3
    two-layer:             y = down(act(up(x)))                 GPT-2 c_fc/c_proj, fc1/fc2, Sequential

Projections may be `nn.Linear` (weight [out, in]) or GPT-2's `Conv1D` (weight [in, out]); `read_ffn`
returns them in one orientation, [D, F] for gate/up and [F, D] for down, the orientation of the
stacked expert weights (`w_up_EDF`, `w_down_EFD`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

# Default child names, most specific first. (gate, up, down) for gated MLPs, (up, down) otherwise.
GATED_NAMES: tuple[tuple[str, str, str], ...] = (
    ("gate_proj", "up_proj", "down_proj"),  # HF Llama, Mistral, Qwen2/3, Gemma, Phi-3 (unfused)
    ("w1", "w3", "w2"),  # Meta's Llama/Mistral reference code, torchtitan
    ("wi_0", "wi_1", "wo"),  # HF T5 gated-GELU
    ("gate", "up", "down"),
    ("fc_gate", "fc_up", "fc_down"),
)
# (gate_up, down) for gated MLPs whose gate and up projections are one [D -> 2F] Linear, gate half first.
FUSED_NAMES: tuple[tuple[str, str], ...] = (("gate_up_proj", "down_proj"),)  # HF Phi-3
TWO_LAYER_NAMES: tuple[tuple[str, str], ...] = (
    ("c_fc", "c_proj"),  # HF GPT-2 (Conv1D)
    ("fc1", "fc2"),  # OPT, ViT, BART, many user models
    ("fc_in", "fc_out"),  # GPT-J
    ("dense_h_to_4h", "dense_4h_to_h"),  # GPT-NeoX, Falcon, Bloom
    ("lin1", "lin2"),  # DistilBERT
    ("w_in", "w_out"),
    ("up_proj", "down_proj"),  # a non-gated MLP with Llama-style names
    ("up", "down"),
)
# Attribute names under which FFNs keep their activation module.
ACTIVATION_ATTRS: tuple[str, ...] = ("act_fn", "act", "activation", "activation_fn", "act_layer", "nonlinearity")
# Children that carry no parameters and do not change the FFN's function in eval mode.
_HARMLESS = (nn.Dropout, nn.Identity)


@dataclass(frozen=True)
class FFNLayout:
    """Where a dense FFN keeps its projections (child names; "0"/"2" for an nn.Sequential).

    With `fused`, `up` names one projection computing [gate | up] (gate half first) and `gate` is None.
    """

    up: str
    down: str
    gate: str | None = None
    fused: bool = False

    @property
    def gated(self) -> bool:
        return self.gate is not None or self.fused

    def names(self) -> tuple[str, ...]:
        return tuple(n for n in (self.gate, self.up, self.down) if n is not None)


@dataclass
class DenseFFN:
    """A dense FFN's weights in expert orientation, plus what is needed to compute it again."""

    w_up_DF: torch.Tensor
    w_down_FD: torch.Tensor
    w_gate_DF: torch.Tensor | None = None
    b_up_F: torch.Tensor | None = None
    b_down_D: torch.Tensor | None = None
    b_gate_F: torch.Tensor | None = None
    activation: nn.Module | None = None
    layout: FFNLayout | None = field(default=None, compare=False)

    @property
    def hidden_size(self) -> int:
        return self.w_up_DF.shape[0]

    @property
    def ffn_hidden_size(self) -> int:
        return self.w_up_DF.shape[1]

    @property
    def gated(self) -> bool:
        return self.w_gate_DF is not None

    @property
    def has_bias(self) -> bool:
        return any(b is not None for b in (self.b_up_F, self.b_down_D, self.b_gate_F))


def is_projection(m: nn.Module) -> bool:
    """nn.Linear, or a GPT-2 style Conv1D (a Linear with a transposed [in, out] weight)."""
    return isinstance(m, nn.Linear) or _is_conv1d(m)


def _is_conv1d(m: nn.Module) -> bool:
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and getattr(m, "weight", None) is not None


def projection_in_out(m: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a projection."""
    if isinstance(m, nn.Linear):
        return m.in_features, m.out_features
    return int(m.weight.shape[0]), int(m.weight.shape[1])


def projection_weight_in_out(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight as [in, out] (x @ W) and the bias, detached."""
    w = m.weight.detach()
    w_in_out = w.t() if isinstance(m, nn.Linear) else w
    b = m.bias.detach() if getattr(m, "bias", None) is not None else None
    return w_in_out, b


def infer_layout(module: nn.Module, layout: FFNLayout | None = None) -> list[FFNLayout]:
    """Every default layout that `module` matches (more than one means the match is ambiguous).

    A match needs the named projections as direct children and nothing else with parameters, so that a
    transformer block holding both attention and fc1/fc2 directly is not mistaken for its FFN.
    With an explicit `layout`, only that one is checked.
    """
    children = dict(module.named_children())
    if isinstance(module, nn.Sequential):
        seq = _sequential_layout(module)
        return [seq] if seq is not None and (layout is None or layout == seq) else []
    candidates: list[FFNLayout] = []
    if layout is not None:
        candidates = [layout]
    else:
        candidates = [FFNLayout(gate=g, up=u, down=d) for g, u, d in GATED_NAMES]
        candidates += [FFNLayout(up=u, down=d, fused=True) for u, d in FUSED_NAMES]
        candidates += [FFNLayout(up=u, down=d) for u, d in TWO_LAYER_NAMES]
    found = []
    for cand in candidates:
        if not all(n in children and is_projection(children[n]) for n in cand.names()):
            continue
        others = [c for n, c in children.items() if n not in cand.names()]
        if any(sum(p.numel() for p in c.parameters()) > 0 for c in others):
            continue
        found.append(cand)
    # A gated layout includes a two-layer one with the same up/down names; keep the gated reading.
    gated_pairs = {(f.up, f.down) for f in found if f.gate is not None}
    return [f for f in found if f.gated or (f.up, f.down) not in gated_pairs]


def _sequential_layout(seq: nn.Sequential) -> FFNLayout | None:
    """Sequential(Linear, act, [Dropout...], Linear, [Dropout...]) -> up="0", down=index of the 2nd Linear."""
    items = list(seq.named_children())
    projections = [(n, m) for n, m in items if is_projection(m)]
    if len(projections) != 2 or items[0][1] is not projections[0][1]:
        return None
    between = [m for n, m in items if n not in (projections[0][0], projections[1][0])]
    if any(sum(p.numel() for p in m.parameters()) > 0 for m in between):
        return None
    activations = [m for m in between if not isinstance(m, _HARMLESS)]
    if len(activations) != 1:
        return None
    return FFNLayout(up=projections[0][0], down=projections[1][0])


def find_activation(module: nn.Module, layout: FFNLayout) -> nn.Module | None:
    """The FFN's activation module, if it keeps one as a child; None when its forward calls a function."""
    children = dict(module.named_children())
    for attr in ACTIVATION_ATTRS:
        act = getattr(module, attr, None)
        if isinstance(act, nn.Module) and not is_projection(act):
            return act
    rest = [m for n, m in children.items() if n not in layout.names() and not isinstance(m, _HARMLESS)]
    return rest[0] if len(rest) == 1 and not list(rest[0].parameters()) else None


def check_shapes(name: str, module: nn.Module, layout: FFNLayout) -> tuple[int, int]:
    """(D, F) of a matched FFN; ValueError naming the projection when the shapes do not chain."""
    children = dict(module.named_children())
    d_in, f = projection_in_out(children[layout.up])
    f_down, d_out = projection_in_out(children[layout.down])
    problems = []
    if layout.fused:
        if f % 2:
            problems.append(f"the fused {layout.up} produces {f} features, not an even [gate | up] pair")
        f //= 2
    if layout.gate is not None:
        g_in, g_out = projection_in_out(children[layout.gate])
        if (g_in, g_out) != (d_in, f):
            problems.append(f"{layout.gate} maps {g_in}->{g_out} but {layout.up} maps {d_in}->{f}")
    if f_down != f:
        problems.append(f"{layout.down} takes {f_down} features but {layout.up} produces {f}")
    if d_out != d_in:
        problems.append(f"{layout.down} produces {d_out} features but the block's input has {d_in}")
    if problems:
        raise ValueError(
            f"moefy: module '{name}' ({type(module).__name__}) looks like an FFN with layout {layout} but its "
            f"shapes are incompatible with an MoE layer: {'; '.join(problems)}. Point `target=` at the real "
            "FFN block, or pass `layout=` with the right projection names."
        )
    return d_in, f


def read_ffn(module: nn.Module, layout: FFNLayout, activation: nn.Module | None = None) -> DenseFFN:
    """The weights of a matched FFN in expert orientation (detached views, no copy)."""
    children = dict(module.named_children())
    w_up, b_up = projection_weight_in_out(children[layout.up])
    w_down, b_down = projection_weight_in_out(children[layout.down])
    w_gate, b_gate = (None, None)
    if layout.gate is not None:
        w_gate, b_gate = projection_weight_in_out(children[layout.gate])
    if layout.fused:
        (w_gate, w_up), (b_gate, b_up) = _split_gate_up(w_up, b_up)
    return DenseFFN(
        w_up_DF=w_up,
        w_down_FD=w_down,
        w_gate_DF=w_gate,
        b_up_F=b_up,
        b_down_D=b_down,
        b_gate_F=b_gate,
        activation=activation,
        layout=layout,
    )


def dense_ffn_from_state_dict(
    state_dict: dict[str, torch.Tensor],
    prefix: str,
    layout: FFNLayout,
    conv1d: bool,
    activation: nn.Module | None,
) -> DenseFFN:
    """The same as `read_ffn`, from a dense checkpoint's tensors under `prefix` (e.g. "layers.0.mlp.")."""

    def proj(name: str | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if name is None:
            return None, None
        key = f"{prefix}{name}.weight"
        if key not in state_dict:
            raise KeyError(f"load_dense_state_dict: the dense checkpoint has no '{key}'.")
        w = state_dict[key]
        return (w if conv1d else w.t()), state_dict.get(f"{prefix}{name}.bias")

    w_up, b_up = proj(layout.up)
    w_down, b_down = proj(layout.down)
    w_gate, b_gate = proj(layout.gate)
    assert w_up is not None and w_down is not None
    if layout.fused:
        (w_gate, w_up), (b_gate, b_up) = _split_gate_up(w_up, b_up)
    return DenseFFN(w_up, w_down, w_gate, b_up, b_down, b_gate, activation, layout)


def dense_keys(prefix: str, layout: FFNLayout, state_dict: dict[str, torch.Tensor]) -> list[str]:
    """The checkpoint keys a dense FFN under `prefix` owns."""
    keys = []
    for n in layout.names():
        keys += [k for k in (f"{prefix}{n}.weight", f"{prefix}{n}.bias") if k in state_dict]
    return keys


def is_silu(act: nn.Module | None) -> bool:
    return act is not None and (isinstance(act, nn.SiLU) or type(act).__name__ in ("SiLUActivation", "SiLU"))


def _split_gate_up(
    w_D2F: torch.Tensor, b_2F: torch.Tensor | None
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor | None, torch.Tensor | None]]:
    """[gate | up] halves of a fused projection's [D, 2F] weight and [2F] bias (gate first, as in Phi-3)."""
    w_gate, w_up = w_D2F.chunk(2, dim=-1)
    b_gate, b_up = b_2F.chunk(2, dim=-1) if b_2F is not None else (None, None)
    return (w_gate, w_up), (b_gate, b_up)
