"""Probes: hooks that fingerprint what each module of an MoE model computes, forward and backward.

Probe points, by the module that produces them (name = module path + kind):
    embedding       nn.Embedding output
    attention       Attention output
    router          TopKRouter logits_TE (float32 by design; the first place router drift shows)
    routing         the discrete decision: topk_ids_TK per token (see `routing_fingerprint`); once a
                    token picks a different expert, permute/experts outputs of that layer are
                    comparable only through order-independent norms
    permute         GroupedExperts input: token copies grouped by expert (the permute result)
    all_to_all      dispatcher output (tokens after the expert-parallel exchange), when a non-local dispatcher is set
    experts         GroupedExperts output (the grouped-GEMM path or its fallback)
    all_to_all_back dispatcher combine output, when a non-local dispatcher is set
    shared_experts  shared-expert MLP output
    moe             MoE output: unpermute + probs-weighted combine + shared experts
    mlp             dense FFN output (first_k_dense blocks)
    lm_head         logits
Forward: the output's fingerprint, in execution order. Backward: the fingerprint of the gradient
w.r.t. that output (a tensor hook), in the order backward reaches it. Parameter gradients are
fingerprinted after backward by `grad_fingerprints`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from moe_plugin.align.fingerprint import Fingerprint, fingerprint
from moe_plugin.layers.attention import Attention
from moe_plugin.layers.dispatcher import LocalDispatcher
from moe_plugin.layers.experts import GroupedExperts
from moe_plugin.layers.feed_forward import FeedForward
from moe_plugin.layers.moe import MoE
from moe_plugin.layers.norm_head import NormHead
from moe_plugin.layers.router import RouterOutput, TopKRouter


def _kind(name: str, module: nn.Module, lm_head: nn.Module | None) -> str | None:
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, Attention):
        return "attention"
    if isinstance(module, TopKRouter):
        return "router"
    if isinstance(module, GroupedExperts):
        return "experts"
    if isinstance(module, MoE):
        return "moe"
    if isinstance(module, FeedForward):
        return "shared_experts" if name.endswith("shared_experts") else "mlp"
    if module is lm_head or isinstance(module, NormHead):
        return "lm_head"
    return None


class ModuleProbes:
    """Attach with `probes = ModuleProbes(model)`; call `start_step()` before each forward, read
    `forward` / `backward` after backward, `remove()` when done."""

    def __init__(self, model: nn.Module) -> None:
        self.forward: dict[str, Fingerprint] = {}
        self.backward: dict[str, Fingerprint] = {}
        self.routing: dict[str, dict[str, Any]] = {}
        self.kinds: dict[str, str] = {}
        self._handles: list[Any] = []
        self._wrapped: list[tuple[Any, str, Any]] = []
        lm_head = getattr(model, "lm_head", None)
        for name, module in model.named_modules():
            kind = _kind(name, module, lm_head)
            if kind is None:
                continue
            if kind == "experts":
                self._add(
                    f"{name.rsplit('.', 1)[0]}.permute" if "." in name else "permute", "permute", module, pre=True
                )
            self._add(name, kind, module)
            if isinstance(module, MoE) and not isinstance(module.dispatcher, LocalDispatcher):
                self._wrap_dispatcher(name, module)

    def _add(self, point: str, kind: str, module: nn.Module, pre: bool = False) -> None:
        self.kinds[point] = kind
        if pre:

            def pre_hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
                self._observe(point, args[0])

            self._handles.append(module.register_forward_pre_hook(pre_hook))
            return

        if kind == "router":
            self.kinds[routing_point(point)] = "routing"

        def hook(_m: nn.Module, _args: tuple[Any, ...], output: Any) -> None:
            if isinstance(output, RouterOutput):
                self._observe(point, output.logits_TE)
                self.routing[routing_point(point)] = routing_fingerprint(output.topk_ids_TK)
                return
            self._observe(point, output)

        self._handles.append(module.register_forward_hook(hook))

    def _wrap_dispatcher(self, name: str, moe: MoE) -> None:
        dispatcher = moe.dispatcher
        for method, kind in (("dispatch", "all_to_all"), ("combine", "all_to_all_back")):
            original = getattr(dispatcher, method)
            point = f"{name}.{kind}"
            self.kinds[point] = kind
            setattr(dispatcher, method, self._observing(original, point))
            self._wrapped.append((dispatcher, method, original))

    def _observing(self, fn: Callable[..., Any], point: str) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            out = fn(*args, **kwargs)
            self._observe(point, out[0] if isinstance(out, tuple) else out)
            return out

        return wrapper

    def _observe(self, point: str, t: torch.Tensor) -> None:
        self.forward[point] = fingerprint(t)
        if t.requires_grad:

            def grad_hook(g: torch.Tensor) -> None:
                self.backward[point] = fingerprint(g)

            t.register_hook(grad_hook)

    def start_step(self) -> None:
        self.forward = {}
        self.backward = {}
        self.routing = {}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        for obj, method, original in self._wrapped:
            setattr(obj, method, original)
        self._handles, self._wrapped = [], []


MAX_STORED_IDS = 16384


def routing_point(router_point: str) -> str:
    """`layers.0.ffn.router` -> `layers.0.ffn.routing` (the MoE layer prefix is shared with permute/experts)."""
    return f"{router_point.rsplit('.', 1)[0]}.routing" if "." in router_point else "routing"


@torch.no_grad()
def routing_fingerprint(topk_ids_TK: torch.Tensor) -> dict[str, Any]:
    """Top-k choices as sorted expert sets per token: the ids themselves when small, else a hash."""
    sets_TK = topk_ids_TK.detach().sort(dim=-1).values.to("cpu", torch.int64)
    counts = torch.bincount(sets_TK.reshape(-1)).tolist()
    out: dict[str, Any] = {"tokens": sets_TK.shape[0], "k": sets_TK.shape[-1], "counts": counts}
    if sets_TK.numel() <= MAX_STORED_IDS:
        out["ids"] = sets_TK.reshape(-1).tolist()
    else:
        import hashlib

        out["hash"] = hashlib.sha256(sets_TK.numpy().tobytes()).hexdigest()[:16]
    return out


def routing_flip_fraction(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Fraction of tokens whose set of chosen experts differs between two routing fingerprints.

    Exact when both stored the ids; otherwise 0 for equal hashes, else the lower bound
    sum|counts_a - counts_b| / (2 * K * tokens) from the per-expert counts (at least one flip).
    """
    if a["tokens"] != b["tokens"] or a["k"] != b["k"]:
        return float("nan")
    if "ids" in a and "ids" in b:
        k = a["k"]
        ia, ib = a["ids"], b["ids"]
        flips = sum(ia[t * k : (t + 1) * k] != ib[t * k : (t + 1) * k] for t in range(a["tokens"]))
        return flips / max(a["tokens"], 1)
    if a.get("hash") is not None and a.get("hash") == b.get("hash"):
        return 0.0
    ca, cb = a["counts"], b["counts"]
    n = max(len(ca), len(cb))
    l1 = sum(abs((ca[i] if i < len(ca) else 0) - (cb[i] if i < len(cb) else 0)) for i in range(n))
    return max(l1 / (2 * a["k"] * max(a["tokens"], 1)), 1.0 / max(a["tokens"], 1))


def grad_fingerprints(model: nn.Module) -> dict[str, Fingerprint]:
    """Fingerprint of every parameter's gradient (router and expert weights included), by name."""
    return {n: fingerprint(p.grad) for n, p in model.named_parameters() if p.grad is not None}
