"""The fused local MoE node (permute-gather + SwiGLU experts + weighted combine in one autograd node) against the
slow obvious reference permute -> experts_loop -> unpermute_reference: outputs and the gradients of x, the
combine weights (through the router logits) and the three expert weights, fp32 tolerance."""

from __future__ import annotations

import pytest
import torch

from moe_plugin.kernels.local_moe import local_swiglu_moe
from moe_plugin.layers.experts import experts_loop
from moe_plugin.layers.permute import permute, sort_by_expert, unpermute_reference

TOL = {"atol": 1e-5, "rtol": 1e-5}


def _problem(T: int, D: int, F: int, E: int, K: int, routing: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=gen)
    logits = torch.randn(T, E, generator=gen)
    if routing == "skewed":  # expert 0 in nearly every token's top-k
        logits[:, 0] += 6.0
    elif routing == "empty":  # only the first K+1 experts are ever chosen: the others get no rows
        logits[:, K + 1 :] -= 100.0
    ws = [torch.randn(E, D, F, generator=gen) / 4, torch.randn(E, D, F, generator=gen) / 4]
    ws.append(torch.randn(E, F, D, generator=gen) / 4)
    return {"x": x, "logits": logits, "ws": ws, "K": K, "grad_out": torch.randn(T, D, generator=gen)}


def _forward(path: str, x, logits, ws, K):
    E = ws[0].shape[0]
    probs_TK, ids_TK = torch.topk(torch.softmax(logits, dim=-1), K, dim=-1)
    probs_TK = probs_TK / probs_TK.sum(-1, keepdim=True)
    if path == "fused":
        perm = sort_by_expert(ids_TK, E)
        s = perm.state
        return local_swiglu_moe(x, probs_TK, *ws, s.order_N, s.token_idx_N, perm.tokens_per_expert_E)
    p = permute(x, ids_TK, E)
    return unpermute_reference(experts_loop(p.x_ND, p.tokens_per_expert_E, *ws), probs_TK, p.state)


def _run(path: str, prob: dict, need_x: bool = True, need_p: bool = True, autocast: bool = False):
    x = prob["x"].clone().requires_grad_(need_x)
    logits = prob["logits"].clone().requires_grad_(need_p)
    ws = [w.clone().requires_grad_() for w in prob["ws"]]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = _forward(path, x, logits, ws, prob["K"])
    (out.float() * prob["grad_out"]).sum().backward()
    names = ("x", "logits", "w_gate", "w_up", "w_down")
    return out.detach(), dict(zip(names, [x.grad, logits.grad, *(w.grad for w in ws)]))


def _assert_close(a, b, **tol):
    torch.testing.assert_close(a[0], b[0], **tol)
    for name in a[1]:
        if b[1][name] is None:
            assert a[1][name] is None, name
        else:
            torch.testing.assert_close(a[1][name], b[1][name], **tol, msg=lambda m, n=name: f"{n}: {m}")


CASES = {
    # name: T, D, F, E, K, routing
    "coarse_balanced": (64, 16, 32, 8, 2, "balanced"),  # F > D: the weight scales y
    "coarse_skewed": (64, 16, 32, 8, 2, "skewed"),
    "fine_balanced": (48, 16, 8, 16, 6, "balanced"),  # F <= D: the weight scales h
    "fine_skewed": (48, 16, 8, 16, 6, "skewed"),
    "empty_experts": (40, 16, 12, 8, 2, "empty"),
    "top1": (40, 16, 12, 8, 1, "balanced"),
    "one_token": (1, 16, 12, 8, 3, "balanced"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference_outputs_and_all_grads(case):
    prob = _problem(*CASES[case])
    fused, ref = _run("fused", prob), _run("reference", prob)
    _assert_close(fused, ref, **TOL)
    if case == "empty_experts":  # experts without rows: exact zero weight gradients
        for name in ("w_gate", "w_up", "w_down"):
            assert torch.count_nonzero(fused[1][name][4:]) == 0


@pytest.mark.parametrize(("need_x", "need_p"), [(False, True), (True, False), (False, False)])
def test_inputs_without_grad(need_x, need_p):
    prob = _problem(*CASES["fine_balanced"])
    _assert_close(_run("fused", prob, need_x, need_p), _run("reference", prob, need_x, need_p), **TOL)


def test_retain_graph_second_backward_gives_same_grads():
    prob = _problem(*CASES["coarse_balanced"])
    x, logits = prob["x"].clone().requires_grad_(), prob["logits"].clone().requires_grad_()
    ws = [w.clone().requires_grad_() for w in prob["ws"]]
    out = _forward("fused", x, logits, ws, prob["K"])
    out.backward(prob["grad_out"], retain_graph=True)
    first = [t.grad.clone() for t in (x, logits, *ws)]
    for t in (x, logits, *ws):
        t.grad = None
    out.backward(prob["grad_out"])  # saved tensors intact
    for a, t in zip(first, (x, logits, *ws)):
        torch.testing.assert_close(a, t.grad)


def test_inference_and_autocast_bf16():
    prob = _problem(*CASES["fine_skewed"])
    with torch.no_grad():
        y = _forward("fused", prob["x"], prob["logits"], prob["ws"], prob["K"])
    assert not y.requires_grad
    fused, ref = _run("fused", prob, autocast=True), _run("reference", prob, autocast=True)
    assert fused[0].dtype == ref[0].dtype == torch.bfloat16  # computes in the autocast dtype, as `@` does
    assert all(g.dtype == torch.float32 for g in fused[1].values())  # fp32 leaves get fp32 gradients
    _assert_close(fused, ref, atol=0.1, rtol=0.05)
    torch.testing.assert_close(fused[0].float(), y, atol=0.1, rtol=0.05)


def test_counts_must_cover_every_copy():
    prob = _problem(*CASES["top1"])
    ids = torch.zeros(40, 1, dtype=torch.long)
    perm = sort_by_expert(ids, 8)
    s = perm.state
    bad = torch.tensor([39, 0, 0, 0, 0, 0, 0, 0])
    with pytest.raises(ValueError, match="cover all 40 token copies"):
        local_swiglu_moe(prob["x"], torch.ones(40, 1), *prob["ws"], s.order_N, s.token_idx_N, bad)
