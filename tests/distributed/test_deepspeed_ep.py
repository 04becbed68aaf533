"""deepspeed_ep (DeepSpeed ZeRO + our expert parallelism) through `python train.py`, on gloo with DS_ACCELERATOR=cpu.

Reference R: plain Lightning, one process, global batch 8, 20 steps, gradient clipping at 1.0 (trainer default),
checkpoints at steps 10 and 20.
- Z2: ZeRO-2, EP=2 on 2 processes: same losses, balance and z-loss (1e-5) as R, same weights and Adam state at 20.
- Z1: ZeRO-1, EP=2 on 4 processes (2 replicas of each expert: ZeRO partitions and reduces experts over the
      expert-data group), writing DeepSpeed's own checkpoint directories: same losses as R; its step-10 directory,
      converted by `moe-plugin ckpt convert`, resumes in plain Lightning on one process with R's steps 11..20.
- moving runs: Z2@10 -> expert_parallel EP=1 (1 process); R@10 (plain) -> deepspeed_ep ZeRO-2 EP=2 (2 processes).
- Z3: ZeRO-3, EP=2 on 2 processes (parameters partitioned too; MoE layers are ZeRO-3 leaf modules): same losses,
      weights and Adam state as R; R@10 resumes in ZeRO-3 EP=2 with R's steps 11..20 (ZeRO-3 restore by name).
- converter: Z2@10 (layout-free) -> DeepSpeed directory (written by DeepSpeed's engine) -> resumed by DeepSpeed's
      own loader with R's steps 11..20, and converted back bit for bit.
- Z3 at W=2, EP=1: experts partitioned by ZeRO-3 over an expert-data group of 2 ranks: same curve and state as R.
- Z3 at W=4, EP=2: experts partitioned over their 2 replicas, dense parameters over 4 ranks: same curve and state.
- reliability: SIGTERM to rank 1 only at step 7 (ZeRO-2, EP=2, 2 processes) -> both ranks exit 143 with a valid
      preemption checkpoint at step 8, and the same command again resumes it (resume=auto) with R's curve; a loss spike rejected by the guard is skipped through
      DeepSpeed's overflow path, so the run (retry included) equals one plain process with the same spike.
- gradient accumulation (2 micro-batches per step) equals one process.
The first DeepSpeed start compiles a small op (~20 s); TORCH_EXTENSIONS_DIR is fixed so later runs reuse it.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import torch
from train_runs import STEPS, Run, ok, same_curve, train

from moe_plugin.cli.main import main as cli
from moe_plugin.lightning.checkpoint_io import check_checkpoint, find_latest_valid

# one build of DeepSpeed's op per machine/CI run, shared by every process the tests start
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(tempfile.gettempdir()) / "moe_plugin_torch_extensions"))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

pytestmark = [pytest.mark.distributed, pytest.mark.slow, pytest.mark.timeout(1500)]

# The issue allows a wider tolerance at ZeRO-3 (parameters gathered per layer, gradients reduce-scattered in
# buckets whose summation order differs from one process's). In fp32 those differences are rounding: measured
# max |loss difference| 4.8e-7 over 20 steps at ZeRO-3 EP=2, so every stage is held to the same 1e-5.
ATOL = 1e-5


def ds(stage: int, ep: int, *more: str) -> tuple[str, ...]:
    return (
        "strategy=deepspeed_ep",
        f"strategy.stage={stage}",
        f"strategy.expert_parallel_size={ep}",
        "strategy.timeout_seconds=120",
        *more,
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("deepspeed_ep")
    return {"tmp": tmp, "R": ok(train(tmp, "R", 1, None)), "Z2": ok(train(tmp, "Z2", 2, None, strategy=ds(2, 2)))}


def _same_state_as_reference(run: Run, ref: Run, tmp: Path, step: int = STEPS) -> None:
    """The run's layout-free checkpoint, consolidated, holds R's weights, Adam moments, step and LR state."""
    out = tmp / f"{run.out_dir.name}_{step}.ckpt"
    assert cli(["ckpt", "consolidate", str(run.checkpoint(step)), str(out)]) == 0
    got = torch.load(out, weights_only=False)
    want = torch.load(ref.checkpoint(step), weights_only=False)
    assert got["state_dict"].keys() == want["state_dict"].keys()
    for k, v in want["state_dict"].items():
        torch.testing.assert_close(got["state_dict"][k], v, rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    got_opt, want_opt = got["optimizer_states"][0], want["optimizer_states"][0]
    assert got_opt["param_groups"] == want_opt["param_groups"]
    for i, st in want_opt["state"].items():
        assert float(got_opt["state"][i]["step"]) == float(st["step"]) == step
        torch.testing.assert_close(got_opt["state"][i]["exp_avg"], st["exp_avg"], rtol=1e-3, atol=1e-7)
        torch.testing.assert_close(got_opt["state"][i]["exp_avg_sq"], st["exp_avg_sq"], rtol=1e-3, atol=1e-9)
    assert got["lr_schedulers"][0]["base_lrs"] == want["lr_schedulers"][0]["base_lrs"]


def test_zero2_ep2_equals_one_process(runs: dict) -> None:
    R, Z2 = runs["R"], runs["Z2"]
    same_curve(Z2, R, range(1, STEPS + 1), ("loss", "balance", "z"))
    _same_state_as_reference(Z2, R, runs["tmp"])


def test_zero3_ep2_equals_one_process_and_resumes(runs: dict) -> None:
    """ZeRO-3 partitions the parameters too (experts over the expert-data group): same curve and state as R."""
    tmp, R = runs["tmp"], runs["R"]
    Z3 = ok(train(tmp, "Z3", 2, None, strategy=ds(3, 2)))
    same_curve(Z3, R, range(1, STEPS + 1), ("loss", "balance", "z"))
    _same_state_as_reference(Z3, R, tmp)
    C = ok(train(tmp, "R10_to_Z3", 2, None, ckpt=R.checkpoint(10), strategy=ds(3, 2)))
    same_curve(C, R, range(11, STEPS + 1))


def test_zero3_experts_partitioned_over_two_replicas_equals_one_process(runs: dict) -> None:
    """ZeRO-3 at W=2, EP=1: every expert has 2 replicas, so ZeRO-3 partitions each expert parameter over an
    expert-data group of 2 ranks (the "autoep_expert" placement with a real partition) and averages its gradient
    over them; same curve and state as R (measured max |loss difference| 4.8e-7 over 20 steps)."""
    tmp, R = runs["tmp"], runs["R"]
    Z3 = ok(train(tmp, "Z3_ep1", 2, None, strategy=ds(3, 1)))
    same_curve(Z3, R, range(1, STEPS + 1), ("loss", "balance", "z"))
    _same_state_as_reference(Z3, R, tmp)


def test_zero3_ep2_on_4_processes_equals_one_process(runs: dict) -> None:
    """ZeRO-3 at W=4, EP=2: each expert has 2 replicas (expert-data groups {0,2} and {1,3}), so ZeRO-3 partitions
    the expert parameters over 2 ranks and the dense ones over 4, with all-to-all over the expert groups {0,1} and
    {2,3}; same global batch (2 sequences per rank): same curve and state as R after 20 steps."""
    tmp, R = runs["tmp"], runs["R"]
    Z3 = ok(train(tmp, "Z3_w4", 4, None, strategy=ds(3, 2), timeout=600))
    same_curve(Z3, R, range(1, STEPS + 1), ("loss", "balance", "z"))
    _same_state_as_reference(Z3, R, tmp)


def test_deepspeed_ep_checkpoint_resumes_in_expert_parallel_ep1(runs: dict) -> None:
    B = ok(train(runs["tmp"], "Z2_10_to_ep1", 1, 1, ckpt=runs["Z2"].checkpoint(10)))
    same_curve(B, runs["R"], range(11, STEPS + 1))


def test_plain_checkpoint_resumes_in_deepspeed_ep(runs: dict) -> None:
    C = ok(train(runs["tmp"], "R10_to_Z2", 2, None, ckpt=runs["R"].checkpoint(10), strategy=ds(2, 2)))
    same_curve(C, runs["R"], range(11, STEPS + 1))


def test_zero1_on_4_processes_deepspeed_checkpoints_convert(runs: dict) -> None:
    tmp, R = runs["tmp"], runs["R"]
    Z1 = ok(train(tmp, "Z1_w4", 4, None, strategy=ds(1, 2, "strategy.checkpoint_format=deepspeed"), timeout=600))
    same_curve(Z1, R, range(1, STEPS + 1), ("loss", "balance", "z"))
    ds_dir = Z1.checkpoint(10)
    assert (ds_dir / "latest").is_file(), sorted(p.name for p in ds_dir.iterdir())
    converted = tmp / "Z1_10.ckpt"
    assert cli(["ckpt", "convert", str(ds_dir), str(converted)]) == 0
    D = ok(train(tmp, "Z1_10_to_plain", 1, None, ckpt=converted))
    same_curve(D, R, range(11, STEPS + 1))


def test_layout_free_to_deepspeed_directory_and_back(runs: dict) -> None:
    """A layout-free checkpoint (Z2@10: the sharded format expert_parallel writes) -> `ckpt convert --world-size 2
    --expert-parallel-size 2 --stage 2` (DeepSpeed's engine writes the directory) -> resumed by DeepSpeed's own
    loader (same layout) with R's steps 11..20; and the directory converts back to the same tensors, bit for bit."""
    tmp, R, Z2 = runs["tmp"], runs["R"], runs["Z2"]
    ds_dir = tmp / "Z2_10_deepspeed"
    layout = ["--world-size", "2", "--expert-parallel-size", "2", "--stage", "2"]
    assert cli(["ckpt", "convert", str(Z2.checkpoint(10)), str(ds_dir), *layout]) == 0
    assert (ds_dir / "latest").is_file() and len(list((ds_dir / "checkpoint").glob("*optim_states.pt"))) == 2
    source, back = tmp / "Z2_10.ckpt", tmp / "Z2_10_back.ckpt"
    assert cli(["ckpt", "consolidate", str(Z2.checkpoint(10)), str(source)]) == 0
    assert cli(["ckpt", "convert", str(ds_dir), str(back)]) == 0
    want, got = torch.load(source, weights_only=False), torch.load(back, weights_only=False)
    assert got["state_dict"].keys() == want["state_dict"].keys()
    for k, v in want["state_dict"].items():
        assert torch.equal(got["state_dict"][k], v), k
    assert got["optimizer_states"][0]["param_groups"] == want["optimizer_states"][0]["param_groups"]
    for i, st in want["optimizer_states"][0]["state"].items():
        for k, v in st.items():
            assert torch.equal(torch.as_tensor(got["optimizer_states"][0]["state"][i][k]), torch.as_tensor(v)), (i, k)
    assert got["lr_schedulers"] == want["lr_schedulers"] and got["global_step"] == want["global_step"] == 10
    E = ok(train(tmp, "Z2_10_deepspeed_to_Z2", 2, None, ckpt=ds_dir, strategy=ds(2, 2)))
    same_curve(E, R, range(11, STEPS + 1))


def test_gradient_accumulation_equals_one_process(runs: dict) -> None:
    """2 micro-batches per step: DeepSpeed accumulates and scales (1/2), experts reduced once per step."""
    tmp = runs["tmp"]
    acc = ("trainer.accumulate_grad_batches=2", "trainer.max_steps=6")
    ref = ok(train(tmp, "acc_ref", 1, None, extra=acc, batch_size=4))
    z = ok(train(tmp, "acc_z2", 2, None, extra=acc, batch_size=2, strategy=ds(2, 2)))
    want, got = ref.rows(), z.rows()
    assert len(want) == len(got) == 12
    for w, g in zip(want, got):
        assert w["step"] == g["step"] and abs(g["loss"] - w["loss"]) <= ATOL, (w, g)


FAULTS = "callbacks=[default,fault_injection]"


def test_sigterm_on_one_rank_stops_both_with_a_checkpoint_and_resume_auto_continues(runs: dict) -> None:
    """2 processes, ZeRO-2 EP=2, SIGTERM to rank 1 only at step 7. Lightning's own handler broadcast inside the
    signal handler, so rank 1 waited in that broadcast while rank 0 was in the next all-to-all (gloo "Connection
    closed by peer", no checkpoint); now the handler only records it and the ranks agree at the step boundary
    (lightning/sigterm.py): both save preempted-step000008 and exit 143, and resume=auto continues R's curve."""
    tmp, R = runs["tmp"], runs["R"]
    sigterm = (FAULTS, "+callbacks.fault_injection.faults=[{kind: sigterm, step: 7, rank: 1}]")
    first = train(tmp, "Z2_preempted", 2, None, extra=sigterm, strategy=ds(2, 2))
    assert first.returncode == 143, first.output[-3000:]  # 128 + SIGTERM: preempted, not finished
    logs = first.rank_logs()
    assert len(logs) == 2 and all("exits with status 143" in log for log in logs), first.output[-3000:]
    assert "sigterm at step 7 on rank 1" in logs[1] and "fault injection" not in logs[0]  # rank 0 got no signal
    saved = first.out_dir / "checkpoints" / "preempted-step000008.ckpt"
    assert check_checkpoint(saved).valid, check_checkpoint(saved).reason
    assert check_checkpoint(find_latest_valid(first.out_dir / "checkpoints")).global_step == 8
    assert sorted(first.curve()) == list(range(1, 9))  # step 7 finished (step 8 in global_step terms), no more
    again = ok(train(tmp, "Z2_preempted", 2, None, extra=sigterm, strategy=ds(2, 2)))  # resume=auto (default)
    assert "resuming from" in again.output and "preempted-step000008" in again.output
    same_curve(again, R, range(1, STEPS + 1))


def _spike_events(run: Run) -> list[dict]:
    lines = (run.out_dir / "events.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e.get("source") == "spike_guard"]


def test_rejected_update_is_skipped_like_one_process(runs: dict) -> None:
    """The guard (warm after 3 steps here) rejects the spiked step 8 and retries its batch: under deepspeed_ep the
    ZeRO optimizer skips that update (DeepSpeed's overflow path; ZeRO-2 and ZeRO-3 take different code), so every
    batch's loss equals one process's."""
    tmp = runs["tmp"]
    spike = (
        FAULTS,
        "+callbacks.fault_injection.faults=[{kind: spike, step: 8}]",
        "callbacks.spike.warmup_steps=3",
        "trainer.max_steps=12",
    )
    ref = ok(train(tmp, "spike_ref", 1, None, extra=spike))
    assert [e["event"] for e in _spike_events(ref)][:1] == ["retry"], _spike_events(ref)
    want = ref.rows()
    assert len(want) == 12  # the rejected step counts as a step (its batch is retried at the next)
    for stage in (2, 3):
        z = ok(train(tmp, f"spike_z{stage}", 2, None, extra=spike, strategy=ds(stage, 2)))
        assert [e["event"] for e in _spike_events(z)][:1] == ["retry"], _spike_events(z)
        got = z.rows()
        assert len(got) == len(want)
        for i, (w, g) in enumerate(zip(want, got)):
            assert w["step"] == g["step"], (stage, w, g)
            if i and w["loss"] > 2 * want[i - 1]["loss"]:
                # the spiked attempt itself: its noise is drawn per rank for the rank's rows, so its value depends
                # on the layout; what must match is everything after it (the update was skipped or not)
                assert g["loss"] > 2 * got[i - 1]["loss"], (stage, w, g)
                continue
            assert abs(g["loss"] - w["loss"]) <= ATOL, (stage, w, g)
