"""Lightning-level expert parallelism through `python train.py` (subprocesses under a timeout).

Reference R: plain Lightning, one process, global batch 8, 20 steps, checkpoints at steps 10 and 20.
- A:  strategy=expert_parallel EP=2 on 2 processes from scratch: same losses (1e-5), balance and z-loss,
      and the same parameters after step 20 (consolidated) as R.
- resharding matrix, each resumed at step 10 and compared with R's steps 11..20:
      A@10 (EP=2) -> EP=1 on 1 process;   R@10 (plain, EP=1) -> EP=2 on 2 processes;
      A@10 -> consolidated file -> plain Lightning (strategy=auto);   K@10 (EP=2) -> EP=4 on 4 processes.
- K:  EP=2 where rank 1 dies at step 13: rank 0 exits with a clear error (no hang); K@10 resumes (above).
"""

from __future__ import annotations

import json

import pytest
import torch
from train_runs import ATOL, STEPS, Run, ok, same_curve, train

from moe_plugin.cli.main import main as cli

pytestmark = [pytest.mark.distributed, pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    tmp = tmp_path_factory.mktemp("ep_training")
    return {"tmp": tmp, "R": ok(train(tmp, "R", 1, None)), "A": ok(train(tmp, "A", 2, 2))}  # type: ignore[dict-item]


def test_ep2_equals_one_process(runs: dict) -> None:
    R, A = runs["R"], runs["A"]
    same_curve(A, R, range(1, STEPS + 1), ("loss", "balance", "z"))
    out = runs["tmp"] / "A20.ckpt"
    assert cli(["ckpt", "consolidate", str(A.checkpoint(20)), str(out)]) == 0
    got = torch.load(out, weights_only=False)["state_dict"]
    want = torch.load(R.checkpoint(20), weights_only=False)["state_dict"]
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    # Adam state, consolidated to the plain layout, equals the single-process optimizer's
    got_opt = torch.load(out, weights_only=False)["optimizer_states"][0]
    want_opt = torch.load(R.checkpoint(20), weights_only=False)["optimizer_states"][0]
    assert got_opt["param_groups"] == want_opt["param_groups"]
    for i, st in want_opt["state"].items():
        torch.testing.assert_close(got_opt["state"][i]["exp_avg_sq"], st["exp_avg_sq"], rtol=1e-3, atol=1e-9)


def test_inspect_sharded_checkpoint(runs: dict, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["ckpt", "inspect", str(runs["A"].checkpoint(10)), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "sharded" and info["expert_parallel_size"] == 2 and info["world_size"] == 2
    assert info["global_step"] == 10 and info["shard_files"] == ["experts-ep000-of-002.pt", "experts-ep001-of-002.pt"]
    assert info["data_position"] == {"epoch": 0, "samples": 80}


def test_resume_ep2_at_ep1(runs: dict) -> None:
    B = ok(train(runs["tmp"], "A10_to_ep1", 1, 1, ckpt=runs["A"].checkpoint(10)))
    same_curve(B, runs["R"], range(11, STEPS + 1))


def test_resume_plain_at_ep2(runs: dict) -> None:
    C = ok(train(runs["tmp"], "R10_to_ep2", 2, 2, ckpt=runs["R"].checkpoint(10)))
    same_curve(C, runs["R"], range(11, STEPS + 1))


def test_resume_consolidated_in_plain_lightning(runs: dict) -> None:
    plain = runs["tmp"] / "A10.ckpt"
    assert cli(["ckpt", "consolidate", str(runs["A"].checkpoint(10)), str(plain)]) == 0
    E = ok(train(runs["tmp"], "A10_to_plain", 1, None, ckpt=plain))
    same_curve(E, runs["R"], range(11, STEPS + 1))


def test_killed_rank_then_resume_at_ep4(runs: dict) -> None:
    tmp = runs["tmp"]
    K = train(
        tmp,
        "K",
        2,
        2,
        extra=(
            "+callbacks.kill._target_=ep_callbacks.KillRank",
            "+callbacks.kill.rank=1",
            "+callbacks.kill.at_step=13",
        ),
    )
    assert K.returncode != 0, "the surviving rank must exit, not finish"
    assert K.seconds < 240
    assert "another rank died or did not answer" in K.output, K.output[-3000:]
    same_curve(K, runs["R"], range(1, 14)) if len(K.curve()) == 13 else same_curve(K, runs["R"], range(1, 13))
    D = ok(train(tmp, "K10_to_ep4", 4, 4, ckpt=K.checkpoint(10), timeout=420))
    same_curve(D, runs["R"], range(11, STEPS + 1))


def test_gradient_accumulation_equals_one_process(runs: dict) -> None:
    """2 micro-batches per step: expert gradients accumulate locally and are reduced once, before clipping."""
    tmp = runs["tmp"]
    acc = ("trainer.accumulate_grad_batches=2", "trainer.max_steps=6")
    ref = ok(train(tmp, "acc_ref", 1, None, extra=acc, batch_size=4))
    ep = ok(train(tmp, "acc_ep2", 2, 2, extra=acc, batch_size=2))
    want, got = ref.rows(), ep.rows()
    assert len(want) == len(got) == 12
    for w, g in zip(want, got):
        assert w["step"] == g["step"] and abs(g["loss"] - w["loss"]) <= ATOL, (w, g)
