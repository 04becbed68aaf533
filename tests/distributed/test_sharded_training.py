"""Lightning-level FSDP2 x expert parallelism through `python train.py` (subprocesses under a timeout).

Reference R: one process (strategy=expert_parallel, EP 1, the model built on the meta device and
initialised by parallel/materialise.py as every sharded run is), global batch 8, 20 steps, a checkpoint
every 5 steps. (tests/distributed/test_training.py shows EP 1 on one process equals plain Lightning.)
- F: EP 2 x shard 2 on 4 processes from scratch: the same losses, balance and z-loss as R over 20 steps
  (1e-5), and after step 20 the same parameters and Adam state (consolidated to one file by
  `moe-plugin ckpt consolidate`, format version 2 with the dense state in DCP).
- the resharding chain, each leg compared step by step with R:
      F@5 (EP 2 x shard 2, 4 procs) -> X: EP 4 (DDP), 4 procs, steps 6..20
      X@10 (format 1)              -> Y: EP 1 x shard 2, 2 procs, steps 11..20
      Y@15 (format 2)              -> Z: one process (strategy=expert_parallel, EP 1), steps 16..20
"""

from __future__ import annotations

import json

import pytest
import torch
from train_runs import STEPS, ok, same_curve, train

from moe_plugin.cli.main import main as cli

pytestmark = [pytest.mark.distributed, pytest.mark.slow, pytest.mark.timeout(1200)]

EVERY = 5


def _sharded(ep: int, shard: int) -> tuple[str, ...]:
    return (f"strategy.data_parallel_shard_size={shard}",) if shard > 1 else ()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("sharded_training")
    R = ok(train(tmp, "R", 1, 1, extra=("strategy.meta_init=true",), save_every=EVERY))
    F = ok(train(tmp, "F", 4, 2, extra=_sharded(2, 2), save_every=EVERY))
    return {"tmp": tmp, "R": R, "F": F}


def test_ep2_shard2_equals_one_process(runs: dict) -> None:
    R, F = runs["R"], runs["F"]
    same_curve(F, R, range(1, STEPS + 1), ("loss", "balance", "z"))
    ckpt = F.checkpoint(20)
    meta = torch.load(ckpt / "meta.pt", weights_only=False)["moe_plugin_layout"]
    assert meta["format_version"] == 2 and meta["data_parallel_shard_size"] == 2
    assert any(f.startswith("dense/") for f in meta["shard_files"])
    out, ref = runs["tmp"] / "F20.ckpt", runs["tmp"] / "R20.ckpt"
    assert cli(["ckpt", "consolidate", str(ckpt), str(out)]) == 0
    assert cli(["ckpt", "consolidate", str(R.checkpoint(20)), str(ref)]) == 0
    got = torch.load(out, weights_only=False)
    want = torch.load(ref, weights_only=False)
    assert got["state_dict"].keys() == want["state_dict"].keys()
    for k, v in want["state_dict"].items():
        torch.testing.assert_close(got["state_dict"][k], v, rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    got_opt, want_opt = got["optimizer_states"][0], want["optimizer_states"][0]
    assert got_opt["param_groups"] == want_opt["param_groups"]
    for i, st in want_opt["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(got_opt["state"][i][key], st[key], rtol=1e-4, atol=1e-7)
        assert float(got_opt["state"][i]["step"]) == float(st["step"])
    # the checkpoint is valid for resume=auto (sidecars of every file, DCP files included)
    assert cli(["ckpt", "inspect", str(ckpt), "--json"]) == 0


def test_resharding_chain(runs: dict) -> None:
    tmp, R, F = runs["tmp"], runs["R"], runs["F"]
    X = ok(train(tmp, "X", 4, 4, ckpt=F.checkpoint(5), save_every=EVERY))
    same_curve(X, R, range(6, STEPS + 1))
    assert torch.load(X.checkpoint(10) / "meta.pt", weights_only=False)["moe_plugin_layout"]["format_version"] == 1
    Y = ok(train(tmp, "Y", 2, 1, ckpt=X.checkpoint(10), extra=_sharded(1, 2), save_every=EVERY))
    same_curve(Y, R, range(11, STEPS + 1))
    Z = ok(train(tmp, "Z", 1, 1, ckpt=Y.checkpoint(15), save_every=EVERY))
    same_curve(Z, R, range(16, STEPS + 1))
    summary = json.loads((Z.out_dir / "summary.json").read_text())
    assert summary["steps"] == STEPS
