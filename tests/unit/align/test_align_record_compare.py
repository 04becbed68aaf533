"""Record and compare on real differences that exist on this machine: identical runs, 1 vs 2
threads, fp32 vs bf16 autocast, a perturbed router, different batches."""

from __future__ import annotations

import copy

import pytest
import torch

from moe_plugin.align.compare import (
    DEFAULT_TOLERANCES,
    EXIT_ALIGNED,
    EXIT_DIVERGED,
    EXIT_INCOMPARABLE,
    compare_records,
    default_tolerances,
    format_comparison,
)
from moe_plugin.align.probes import ModuleProbes
from moe_plugin.align.record import DEFAULT_MODEL, RecordConfig, markov_batches, record
from moe_plugin.models.decoder import MoEDecoderLM

STEPS = 4


@pytest.fixture(scope="module")
def ref() -> dict:
    return record(RecordConfig(steps=STEPS, threads=1))


def test_probes_cover_every_module_kind_and_are_removed() -> None:
    torch.manual_seed(0)
    model = MoEDecoderLM(**DEFAULT_MODEL)
    probes = ModuleProbes(model)
    model(torch.randint(0, 256, (2, 8))).sum().backward()
    kinds = set(probes.kinds.values())
    assert kinds == {
        "embedding",
        "attention",
        "router",
        "routing",
        "permute",
        "experts",
        "shared_experts",
        "moe",
        "lm_head",
    }
    assert set(probes.forward) | set(probes.routing) == set(probes.kinds)
    assert list(probes.forward)[0] == "embed_tokens" and list(probes.forward)[-1] == "lm_head"
    assert list(probes.backward)[0] == "lm_head"  # backward order: from the loss back
    probes.remove()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_identical_runs_are_bitwise_identical(ref: dict) -> None:
    again = record(RecordConfig(steps=STEPS, threads=1))
    cmp = compare_records(ref, again)
    assert cmp.exit_code == EXIT_ALIGNED
    assert all(e.error.max_abs == 0 for e in cmp.errors)
    assert "ALIGNED" in format_comparison(cmp)


def test_one_vs_two_threads_is_aligned_at_fp32_tolerance(ref: dict) -> None:
    two = record(RecordConfig(steps=STEPS, threads=2))
    cmp = compare_records(ref, two)
    assert cmp.exit_code == EXIT_ALIGNED, format_comparison(cmp)
    assert max(e.error.worst_rel for e in cmp.errors if e.error.comparable) < DEFAULT_TOLERANCES["fp32"].forward


def test_fp32_vs_bf16_is_found_and_localised(ref: dict) -> None:
    bf16 = record(RecordConfig(steps=STEPS, threads=1, precision="bf16-mixed"))
    # With fp32 tolerances the first difference is the first module that computes in bf16: the
    # embedding lookup stays fp32 under autocast, attention's projections do not.
    strict = compare_records(ref, bf16, DEFAULT_TOLERANCES["fp32"])
    assert strict.exit_code == EXIT_DIVERGED
    assert (strict.first.step, strict.first.point, strict.first.phase) == (0, "layers.0.attention", "forward")
    emb = next(e for e in strict.errors if e.step == 0 and e.point == "embed_tokens" and e.phase == "forward")
    assert emb.error.max_abs == 0
    # The default picks bf16 tolerances (the less precise side) and reports where bf16 noise exceeds them.
    default = compare_records(ref, bf16)
    assert default.dtype == "bf16"
    text = format_comparison(default, ref["kinds"])
    assert ("DIVERGED" in text) == (default.exit_code == EXIT_DIVERGED)


def test_a_perturbed_router_is_blamed_on_the_router(ref: dict) -> None:
    """Simulates a vendor kernel bug: the router's logits off by 1% in layer 1 only."""
    import moe_plugin.layers.router as router_mod

    original = router_mod.TopKRouter.forward

    def skewed(self, x_TD, *args):  # type: ignore[no-untyped-def]
        out = original(self, x_TD, *args)
        if self is layer1_router[0]:
            out.logits_TE.mul_(1.01)
        return out

    layer1_router: list = []
    init = MoEDecoderLM.__init__

    def remember(self, *a, **k):  # type: ignore[no-untyped-def]
        init(self, *a, **k)
        layer1_router.append(self.layers[1].ffn.router)

    mp = pytest.MonkeyPatch()
    mp.setattr(router_mod.TopKRouter, "forward", skewed)
    mp.setattr(MoEDecoderLM, "__init__", remember)
    try:
        bad = record(RecordConfig(steps=2, threads=1))
    finally:
        mp.undo()
    cmp = compare_records(ref, bad)
    assert cmp.exit_code == EXIT_DIVERGED
    assert (cmp.first.step, cmp.first.point) == (0, "layers.1.ffn.router")
    clean = [e for e in cmp.errors if e.step == 0 and e.point.startswith("layers.0.")]
    assert all(e.error.max_abs == 0 for e in clean if e.phase == "forward")


def test_different_batches_are_not_comparable(ref: dict) -> None:
    other = record(RecordConfig(steps=STEPS, threads=1, seed=99))
    cmp = compare_records(ref, other)
    assert cmp.exit_code == EXIT_INCOMPARABLE and "different batches" in cmp.problem


def test_routing_flips_switch_permuted_points_to_norms(ref: dict) -> None:
    b = copy.deepcopy(ref)
    routing = b["steps"][0]["routing"]["layers.0.ffn.routing"]
    k = routing["k"]
    ids = routing["ids"]
    ids[0:k] = [(i + 1) % 8 for i in ids[0:k]]  # token 0 picks other experts
    routing["ids"] = ids
    cmp = compare_records(ref, b)
    flip = next(e for e in cmp.errors if e.phase == "routing" and e.point == "layers.0.ffn.routing" and e.step == 0)
    assert flip.error.worst_rel == pytest.approx(1 / routing["tokens"])
    permuted = next(e for e in cmp.errors if e.point == "layers.0.ffn.permute" and e.step == 0 and e.phase == "forward")
    assert permuted.note == "norm only: routing differs"


def test_default_tolerances_follow_the_less_precise_side() -> None:
    assert default_tolerances("fp32", "bf16")[0] == "bf16"
    assert default_tolerances("fp32", "fp32")[0] == "fp32"
    assert DEFAULT_TOLERANCES["bf16"].forward > DEFAULT_TOLERANCES["fp32"].forward


def test_markov_batches_are_learnable_and_deterministic() -> None:
    a = markov_batches(2, 3, 16, 256, seed=1)
    assert torch.equal(a, markov_batches(2, 3, 16, 256, seed=1))
    assert a.shape == (2, 3, 17) and int(a.max()) < 256
    assert torch.equal(markov_batches(5, 3, 16, 256, seed=1)[:2], a)  # prefix-stable


def test_record_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="--precision='fp8'"):
        record(RecordConfig(precision="fp8"))
    with pytest.raises(ValueError, match="--steps=0"):
        record(RecordConfig(steps=0))


def test_operator_records_localise_autocast_to_the_matmuls() -> None:
    from moe_plugin.align.ops import record_ops

    fp32 = record_ops("32-true", threads=1)
    assert compare_records(fp32, record_ops("32-true", threads=1)).exit_code == EXIT_ALIGNED
    bf16 = record_ops("bf16-mixed", threads=1)
    cmp = compare_records(fp32, bf16, DEFAULT_TOLERANCES["fp32"])
    assert (cmp.first.point, cmp.first.phase) == ("matmul", "forward")
    exact = {e.point for e in cmp.errors if e.phase == "forward" and e.error.max_abs == 0}
    # autocast leaves index ops, norms, the router (float32 by design) and the loss in fp32; every
    # matmul-based operator differs, the grouped GEMM included on both expert paths
    assert {"permute_unpermute", "rmsnorm", "cross_entropy", "router_softmax_topk"} <= exact
    assert not {"matmul", "linear", "attention_rope", "swiglu", "grouped_gemm"} & exact
