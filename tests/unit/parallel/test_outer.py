"""The outer step of local SGD (parallel/outer.py) and the island layout (parallel/islands.py), against slow
obvious references: torch.optim.SGD, a hand-written weighted average, explicit softmax."""

from __future__ import annotations

import math

import pytest
import torch

from moe_plugin.lightning.callbacks.spike_detector import EWMAZScore
from moe_plugin.parallel.islands import (
    check_islands,
    parse_expert_parallel_sizes,
    parse_inner_backends,
    parse_islands,
)
from moe_plugin.parallel.mesh import LayoutError
from moe_plugin.parallel.outer import global_weighted_sum, make_slots, outer_sgd_step, screen, step_normalised


@pytest.mark.parametrize("momentum,nesterov", [(0.0, False), (0.8, True), (0.9, False)])
def test_outer_sgd_step_equals_torch_sgd(momentum: float, nesterov: bool) -> None:
    torch.manual_seed(0)
    theta = [torch.randn(3, 4), torch.randn(5)]
    ref = [torch.nn.Parameter(t.clone()) for t in theta]
    opt = torch.optim.SGD(ref, lr=0.7, momentum=momentum, nesterov=nesterov)
    bufs = [torch.zeros_like(t) for t in theta]
    for _ in range(4):
        grads = [torch.randn_like(t) for t in theta]
        for p, g in zip(ref, grads):
            p.grad = g.clone()
        opt.step()
        outer_sgd_step(theta, grads, bufs, lr=0.7, momentum=momentum, nesterov=nesterov)
        for t, p in zip(theta, ref):
            torch.testing.assert_close(t, p.detach(), rtol=0, atol=1e-6)


def test_outer_lr_one_no_momentum_gives_the_average() -> None:
    synced = [torch.tensor([1.0, 2.0])]
    islands = [torch.tensor([0.0, 2.0]), torch.tensor([1.0, 5.0])]
    avg_delta = sum(synced[0] - w for w in islands) / 2
    outer_sgd_step(synced, [avg_delta], [torch.zeros(2)], lr=1.0, momentum=0.0)
    torch.testing.assert_close(synced[0], (islands[0] + islands[1]) / 2)


def test_screen_weights_softmax_uniform_steps_and_clip() -> None:
    norms, steps = [1.0, 2.0, 4.0], [3, 3, 6]
    d = screen(norms, steps, None, "softmax", temperature=1.0, per_step=False)  # EDiT on the raw norms
    e = [math.exp(-n) for n in norms]
    assert d.weights == pytest.approx([x / sum(e) for x in e])
    r = [n * 4 / h for n, h in zip(norms, steps)]  # mean H = 4: norms rescaled to 4 steps
    e = [math.exp(-x / 2.0) for x in r]
    d = screen(norms, steps, None, "softmax", temperature=2.0)
    assert d.scored == pytest.approx(r) and d.weights == pytest.approx([x / sum(e) for x in e])
    assert screen(norms, steps, None, "uniform").weights == pytest.approx([1 / 3] * 3)
    assert screen(norms, steps, None, "steps").weights == pytest.approx([0.25, 0.25, 0.5])
    c = screen(norms, steps, None, "uniform", clip_norm=2.0)
    assert c.clip_coefs == pytest.approx([1.0, 1.0, 0.5])
    assert c.factors == pytest.approx([1 / 3, 1 / 3, 1 / 6])
    with pytest.raises(ValueError, match="strategy.weighting"):
        screen(norms, steps, None, "mean")


def test_step_normalised_screen_equals_edit_for_equal_rounds_and_does_not_starve_a_fast_island() -> None:
    norms = [3.0, 1.0, 2.5]
    assert step_normalised(norms, [5, 5, 5]) == norms  # step-based rounds: EDiT's rule unchanged
    same = screen(norms, [5, 5, 5], None, "softmax")
    assert same.weights == pytest.approx(screen(norms, [5, 5, 5], None, "softmax", per_step=False).weights)
    # time-based rounds: the fast island took 3x the steps and moved 3x as far; per step both moved alike
    fast_slow = ([3.0, 1.0], [15, 5])
    assert screen(*fast_slow, None, "softmax", per_step=False).weights[0] == pytest.approx(1 / (1 + math.e**2))
    assert screen(*fast_slow, None, "softmax").weights == pytest.approx([0.5, 0.5])
    assert step_normalised([2.0, 0.0, 3.0], [4, 0, 2]) == [1.5, 0.0, 4.5]  # an island without steps keeps its norm


def test_screen_rejects_an_anomalous_island_and_keeps_it_out_of_the_statistics() -> None:
    dets = [EWMAZScore(alpha=0.1, warmup_steps=5, threshold=3.0) for _ in range(2)]
    for i in range(10):
        d = screen([1.0 + 0.01 * (i % 3), 1.0 + 0.01 * (i % 2)], [4, 4], dets, "uniform")
        assert all(d.accepted)
    before = dets[1].state_dict()
    d = screen([1.01, 50.0], [4, 4], dets, "uniform")
    assert d.accepted == [True, False] and d.weights == [1.0, 0.0] and d.zscores[1] > 3
    assert dets[1].state_dict() == before  # the rejected norm did not widen island 1's band
    nan = screen([float("nan"), float("nan")], [4, 4], dets, "softmax")
    assert not nan.any_accepted and nan.factors == [0.0, 0.0]


def test_detector_sees_per_step_norms_so_a_longer_round_is_not_an_anomaly() -> None:
    dets = [EWMAZScore(alpha=0.1, warmup_steps=5, threshold=3.0) for _ in range(2)]
    for i in range(10):  # island 0 alternates 10 and 30 local steps, moving the same distance per step
        h0 = 10 if i % 2 else 30
        assert all(screen([0.1 * h0, 0.5], [h0, 5], dets, "softmax").accepted)
    d = screen([0.1 * 30 * 40, 0.5], [30, 5], dets, "softmax")  # 40x the usual movement per step: rejected
    assert d.accepted == [False, True]


def test_global_weighted_sum_single_process_lays_experts_by_global_id() -> None:
    dense, expert = torch.randn(2, 3), torch.randn(2, 5)  # this rank holds experts [2, 4) of 4
    slots = make_slots([("d", dense), ("e", expert)], {"e": (4, 2, 4)})
    assert slots[1].global_shape == (4, 5) and (slots[1].start, slots[1].stop) == (2, 4)
    out = global_weighted_sum(slots, [dense, expert], [0.5, 2.0], None, bucket_numel=7)  # one tensor per bucket
    torch.testing.assert_close(out[0], 0.5 * dense)
    torch.testing.assert_close(out[1], 2.0 * expert)
    # lazily produced inputs (called only when their factor is not 0), results handed over bucket by bucket
    got: dict[int, torch.Tensor] = {}
    calls: list[str] = []

    def make(name: str, t: torch.Tensor):  # noqa: ANN202
        return lambda: calls.append(name) or t

    scalar = torch.tensor(3.0)
    slots3 = make_slots([("d", dense), ("e", expert), ("s", scalar)], {"e": (4, 2, 4)})
    out = global_weighted_sum(
        slots3,
        [make("d", dense), make("e", expert), make("s", scalar)],
        [0.5, 0.0, 1.0],
        None,
        bucket_numel=7,
        consume=lambda i, t: got.__setitem__(i, t.clone()),
    )
    assert out == [] and calls == ["d", "s"] and sorted(got) == [0, 1, 2]
    torch.testing.assert_close(got[0], 0.5 * dense)
    torch.testing.assert_close(got[1], torch.zeros_like(expert))
    torch.testing.assert_close(got[2], scalar)


def test_parse_islands_and_errors() -> None:
    assert parse_islands(4, island_size=2) == [[0, 1], [2, 3]]
    assert parse_islands(3, islands=[[2], [0, 1]]) == [[2], [0, 1]]
    with pytest.raises(LayoutError, match=r"strategy.island_size=3 must divide the world size 4.*\[1, 2, 4\]"):
        parse_islands(4, island_size=3)
    with pytest.raises(LayoutError, match="must partition the ranks 0..3"):
        parse_islands(4, islands=[[0, 1], [1, 2, 3]])
    with pytest.raises(LayoutError, match="exactly one of strategy.island_size"):
        parse_islands(4, island_size=2, islands=[[0, 1], [2, 3]])
    assert parse_expert_parallel_sizes(2, 3) == [2, 2, 2]
    with pytest.raises(LayoutError, match="one per island"):
        parse_expert_parallel_sizes([1, 2], 3)
    with pytest.raises(LayoutError, match=r"island 1 \(ranks \[2\]\).*expert_parallel_size=2 is larger"):
        check_islands([[0, 1], [2]], [2, 2], [4])


def test_parse_inner_backends() -> None:
    assert parse_inner_backends(None, 2) == [None, None]
    assert parse_inner_backends("gloo", 3) == ["gloo"] * 3
    assert parse_inner_backends(["nccl", None], 2) == ["nccl", None]
    with pytest.raises(LayoutError, match=r"strategy.inner_backend=\['nccl'\] lists 1 backends for 2 islands"):
        parse_inner_backends(["nccl"], 2)
