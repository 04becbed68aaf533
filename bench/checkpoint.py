"""How long a checkpoint blocks the training step: AsyncCheckpointIO vs Lightning's default synchronous save.

    python bench/checkpoint.py                    # ling_tiny and a ~100M-parameter MoE, 5 saves each
    python bench/checkpoint.py --reps 3 --json

For each model a real Trainer runs one optimizer step (so AdamW state exists), then `trainer.save_checkpoint`
is timed with each CheckpointIO plugged into the same strategy, interleaved rep by rep:

    lightning   TorchCheckpointIO (Lightning's default): torch.save to memory, then write, in the step
    ours-sync   AsyncCheckpointIO(async_save=False): snapshot + torch.save + sha256 + fsync + rename, in the step
    ours-async  AsyncCheckpointIO(): the step is blocked for the host snapshot only; the write runs in a thread

"blocked" is the time trainer.save_checkpoint takes (what the training loop waits for); "persist" is the
background write that follows for ours-async (waited for before the next measurement, so runs never
overlap). Medians over --reps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moe_plugin.data.datamodule import LMDataModule  # noqa: E402
from moe_plugin.lightning.checkpoint_io import AsyncCheckpointIO  # noqa: E402
from moe_plugin.lightning.module import MoELanguageModule  # noqa: E402
from moe_plugin.models.decoder import MoEDecoderLM  # noqa: E402

LING_TINY = dict(
    vocab_size=256, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64, norm_head=True,
    moe=dict(num_experts=8, top_k=2, expert_hidden_size=256, num_shared_experts=1, shared_expert_hidden_size=256),
)  # fmt: skip
MOE_100M = dict(
    vocab_size=256, hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4, head_dim=64, norm_head=True,
    moe=dict(num_experts=16, top_k=2, expert_hidden_size=512, num_shared_experts=1, shared_expert_hidden_size=512),
)  # fmt: skip
MODELS = {"ling_tiny": LING_TINY, "moe_100m": MOE_100M}


def _corpus() -> list[tuple[str, bytes]]:
    return [(f"d{i}", (b"def f(x):\n    return x + %d\n" % i) * 200) for i in range(20)]


def build_trainer(model_kw: dict[str, Any], root: Path) -> tuple[pl.Trainer, MoELanguageModule]:
    torch.manual_seed(0)
    module = MoELanguageModule(MoEDecoderLM(max_seq_len=64, **model_kw), total_steps=10, warmup_steps=1)
    data = LMDataModule(_corpus(), seq_len=32, batch_size=2, val_fraction=0.2)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        default_root_dir=str(root), use_distributed_sampler=False,
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    return trainer, module


def measure(model: str, reps: int, root: Path) -> dict[str, Any]:
    trainer, module = build_trainer(MODELS[model], root)
    params = sum(p.numel() for p in module.parameters())
    ios = {
        "lightning": TorchCheckpointIO(),
        "ours-sync": AsyncCheckpointIO(async_save=False),
        "ours-async": AsyncCheckpointIO(),
    }
    blocked: dict[str, list[float]] = {k: [] for k in ios}
    persist: list[float] = []
    size = 0
    for rep in range(reps + 1):  # rep 0 warms up the page cache and allocator, not counted
        for name, io in ios.items():
            trainer.strategy.checkpoint_io = io
            path = root / f"{name}.ckpt"
            t0 = time.perf_counter()
            trainer.save_checkpoint(path)
            t1 = time.perf_counter()
            if isinstance(io, AsyncCheckpointIO):
                io.wait()
            t2 = time.perf_counter()
            if rep > 0:
                blocked[name].append(t1 - t0)
                if name == "ours-async":
                    persist.append(t2 - t1)
            size = path.stat().st_size
    med = {k: statistics.median(v) for k, v in blocked.items()}
    return {
        "model": model,
        "params_M": params / 1e6,
        "checkpoint_MB": size / 2**20,
        "lightning_ms": 1e3 * med["lightning"],
        "ours_sync_ms": 1e3 * med["ours-sync"],
        "ours_async_ms": 1e3 * med["ours-async"],
        "async_persist_ms": 1e3 * statistics.median(persist),
        "async_vs_lightning": med["ours-async"] / med["lightning"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for m in args.models:
            rows.append(measure(m, args.reps, Path(tmp) / m))
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(
        "| model | params | ckpt MB | Lightning sync: blocked ms | ours sync (atomic+sha256+fsync) ms "
        "| ours async: blocked ms | async background persist ms | async / Lightning |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['params_M']:.1f}M | {r['checkpoint_MB']:.0f} | {r['lightning_ms']:.0f} | "
            f"{r['ours_sync_ms']:.0f} | {r['ours_async_ms']:.0f} | {r['async_persist_ms']:.0f} | "
            f"{r['async_vs_lightning']:.3f} |"
        )


if __name__ == "__main__":
    main()
