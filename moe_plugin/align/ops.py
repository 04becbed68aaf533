"""`align record --ops`: step 1 of the migration procedure, operator by operator.

Shapes: T tokens, D hidden, F FFN hidden, E experts, K experts per token, N = T*K copies,
B batch, S sequence.

Each operator runs once on fixed inputs (drawn on the CPU from a seeded generator, then moved to the
device and cast) and is fingerprinted forward (its output) and backward (the gradient of every input
and parameter, for a fixed random cotangent). The record has the same format as a training record
with a single step, so `align compare` localises the first operator that differs.

Operators: the ones vendors lack or implement inconsistently (the Ling report, PAPER.md section 4):
matmul, linear, grouped GEMM (the selected expert path), router softmax/top-k, permute/unpermute,
RMSNorm, RoPE attention, SwiGLU, cross-entropy.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from moe_plugin.align.fingerprint import fingerprint
from moe_plugin.align.probes import routing_fingerprint
from moe_plugin.align.record import FORMAT_VERSION, ExpertPathObserver, compute_dtype, tensor_hash
from moe_plugin.layers.attention import Attention
from moe_plugin.layers.experts import GroupedExperts
from moe_plugin.layers.feed_forward import FeedForward
from moe_plugin.layers.norm import RMSNorm
from moe_plugin.layers.permute import permute, unpermute
from moe_plugin.layers.rope import rope_cos_sin
from moe_plugin.layers.router import TopKRouter

T, D, F_, E, K, B, S, H = 64, 64, 128, 8, 2, 2, 32, 4


def _experts(expert_path: str | None) -> GroupedExperts:
    import inspect as pyinspect

    if expert_path is not None and "grouped_mm_backend" in pyinspect.signature(GroupedExperts.__init__).parameters:
        return GroupedExperts(E, D, F_, grouped_mm_backend=expert_path)  # type: ignore[call-arg]
    return GroupedExperts(E, D, F_)


def _permute(x_TD: torch.Tensor, ids_TK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """permute() returns a tuple or a `Permuted` record depending on the layers' version."""
    res = permute(x_TD, ids_TK, E)
    if isinstance(res, tuple):
        return res[0], res[1], res[2]
    return res.x_ND, res.tokens_per_expert_E, res.state


def _operators(
    expert_path: str | None,
) -> dict[str, tuple[Callable[..., Any], list[tuple[int, ...]], torch.nn.Module | None]]:
    """name -> (function of the inputs, input shapes, module holding parameters or None)."""
    router = TopKRouter(D, E, K)
    experts = _experts(expert_path)
    norm = RMSNorm(D)
    attention = Attention(D, H, 2, D // H)
    swiglu = FeedForward(D, F_)
    cos_SDh, sin_SDh = rope_cos_sin(S, D // H, 10000.0)

    def grouped(x_TD: torch.Tensor) -> torch.Tensor:
        ids_TK = torch.arange(T * K, device=x_TD.device).reshape(T, K) % E  # every expert gets copies
        x_ND, counts_E, _ = _permute(x_TD, ids_TK)
        return experts(x_ND, counts_E)

    def routed(x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = router(x_TD)
        return out.probs_TK, out.topk_ids_TK

    def permute_roundtrip(x_TD: torch.Tensor, probs_TK: torch.Tensor) -> torch.Tensor:
        ids_TK = (torch.arange(T * K, device=x_TD.device).reshape(T, K) * 3) % E
        x_ND, _, state = _permute(x_TD, ids_TK)
        return unpermute(x_ND * 2.0, probs_TK.softmax(-1), state)

    def attn(x_BSD: torch.Tensor) -> torch.Tensor:
        return attention(x_BSD, cos_SDh.to(x_BSD.device), sin_SDh.to(x_BSD.device))

    def cross_entropy(logits_TV: torch.Tensor) -> torch.Tensor:
        targets_T = torch.arange(T, device=logits_TV.device) % logits_TV.shape[-1]
        return F.cross_entropy(logits_TV.float(), targets_T)

    return {
        "matmul": (lambda a, b: a @ b, [(T, D), (D, F_)], None),
        "linear": (lambda x, w, bias: F.linear(x, w, bias), [(T, D), (F_, D), (F_,)], None),
        "grouped_gemm": (grouped, [(T, D)], experts),
        "router_softmax_topk": (routed, [(T, D)], router),
        "permute_unpermute": (permute_roundtrip, [(T, D), (T, K)], None),
        "rmsnorm": (norm, [(T, D)], norm),
        "attention_rope": (attn, [(B, S, D)], attention),
        "swiglu": (swiglu, [(T, D)], swiglu),
        "cross_entropy": (cross_entropy, [(T, 256)], None),
    }


def record_ops(
    precision: str = "32-true",
    accelerator: str = "cpu",
    threads: int | None = None,
    expert_path: str | None = None,
    seed: int = 1234,
    label: str = "",
) -> dict[str, Any]:
    """Fingerprint every operator once; returns a one-step record for `align compare`."""
    from moe_plugin.align.record import PRECISIONS, _resolve_device

    if precision not in PRECISIONS:
        raise ValueError(f"--precision={precision!r}: choose one of {', '.join(PRECISIONS)}.")
    if threads is not None:
        torch.set_num_threads(threads)
    device = _resolve_device(accelerator)
    cast = {"bf16-true": torch.bfloat16, "64-true": torch.float64}.get(precision)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16-mixed" else torch.float16)
        if precision in ("bf16-mixed", "16-mixed")
        else contextlib.nullcontext()
    )
    torch.manual_seed(seed)
    ops = _operators(expert_path)
    observer = ExpertPathObserver(ops["grouped_gemm"][2])  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(seed)
    forward, backward, grads, routing, input_hashes = {}, {}, {}, {}, []
    for name, (fn, shapes, module) in ops.items():
        inputs = [torch.randn(s, generator=gen) for s in shapes]
        input_hashes.append(tensor_hash(torch.cat([t.reshape(-1) for t in inputs])))
        inputs = [t.to(device=device, dtype=cast or t.dtype).requires_grad_() for t in inputs]
        if module is not None:
            module.to(device=device, dtype=cast or torch.float32)
            module.zero_grad(set_to_none=True)
        with autocast:
            out = fn(*inputs)
        if isinstance(out, tuple):  # the router: probabilities and the discrete choice
            routing[f"{name}.routing"] = routing_fingerprint(out[1])
            out = out[0]
        forward[name] = fingerprint(out)
        cotangent = torch.randn(out.shape, generator=gen).to(device=device, dtype=out.dtype)
        (out * cotangent).sum().backward()
        for i, t in enumerate(inputs):
            if t.grad is not None:
                backward[f"{name}.input{i}"] = fingerprint(t.grad)
        if module is not None:
            for pname, p in module.named_parameters():
                if p.grad is not None:
                    grads[f"{name}.{pname}"] = fingerprint(p.grad)
    resolved = f"{expert_path or 'auto'}->{observer.remove()}"
    kinds = {n: "op" for n in forward} | {n: "op_grad" for n in backward} | {n: "routing" for n in routing}
    return {
        "format": FORMAT_VERSION,
        "label": label or f"ops {device.type}/{precision}/threads={torch.get_num_threads()}/{resolved}",
        "config": {"model": {"ops": list(ops)}, "ops": True, "precision": precision, "seed": seed},
        "env": {
            "device": str(device),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "expert_path": resolved,
            "compute_dtype": compute_dtype(precision),
        },
        "batches_hash": input_hashes[0],
        "batch_hashes": ["|".join(input_hashes)],
        "init_hash": str(seed),
        "kinds": kinds,
        "steps": [
            {
                "step": 0,
                "loss": float(forward["cross_entropy"].mean),
                "forward": {k: v.as_dict() for k, v in forward.items()},
                "backward": {k: v.as_dict() for k, v in backward.items()},
                "grads": {k: v.as_dict() for k, v in grads.items()},
                "routing": routing,
            }
        ],
    }
