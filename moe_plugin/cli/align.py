"""`moe-plugin align record|compare`: cross-platform numerical alignment (docs/alignment.md).

    moe-plugin align record --ops --out ops.json [--precision ...]        # operators first
    moe-plugin align record --out ref.json [--precision 32-true] [--threads 1] [--accelerator auto]
                            [--expert-path NAME] [--steps 8] [--seed 1234] [model.hidden_size=128 ...]
    moe-plugin align compare ref.json cand.json [--png curves.png] [--tolerance-dtype fp32] [--json]

`compare` exits 0 when aligned, 1 when diverged, 2 when the records are not comparable.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

HELP = "Cross-platform numerical alignment: record a short fingerprinted run, compare two records."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="align_command", required=True)
    rec = sub.add_parser("record", help="run N fixed steps and write per-step loss and per-module fingerprints")
    rec.add_argument("--out", required=True, help="record file to write (JSON)")
    rec.add_argument("--steps", type=int, default=8)
    rec.add_argument("--seed", type=int, default=1234, help="seed of the initial weights and of the batches")
    rec.add_argument("--batch-size", type=int, default=4)
    rec.add_argument("--seq-len", type=int, default=32)
    rec.add_argument("--lr", type=float, default=3e-3)
    rec.add_argument("--precision", default="32-true", help="32-true | bf16-mixed | bf16-true | 16-mixed | 64-true")
    rec.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU reduction order)")
    rec.add_argument("--accelerator", default="cpu", help="auto | cpu | cuda | rocm | npu | xpu | mlu | musa | mps")
    rec.add_argument(
        "--expert-path", default=None, help="expert compute path of moe_plugin.kernels (e.g. the fallback)"
    )
    rec.add_argument("--batches", default=None, help="replay batches saved by another machine's --save-batches")
    rec.add_argument("--save-batches", default=None, help="also save the batches (torch.save) for replay elsewhere")
    rec.add_argument("--label", default="", help="name of this run in tables and plots")
    rec.add_argument(
        "--ops", action="store_true", help="fingerprint single operators instead of training steps (step 1)"
    )
    rec.add_argument(
        "overrides", nargs="*", default=[], help="model overrides, e.g. model.hidden_size=128 model.moe.num_experts=16"
    )

    cmp = sub.add_parser("compare", help="first divergent step and module between two records; exit code for CI")
    cmp.add_argument("reference", help="record A (the trusted run)")
    cmp.add_argument("candidate", help="record B (the new device / precision / layout)")
    cmp.add_argument("--png", default=None, help="loss curves of both runs (default: <candidate>.losses.png)")
    cmp.add_argument(
        "--tolerance-dtype", default=None, help="use this dtype's default tolerances (fp64, fp32, fp16, bf16)"
    )
    cmp.add_argument("--fwd-rtol", type=float, default=None)
    cmp.add_argument("--bwd-rtol", type=float, default=None)
    cmp.add_argument("--grad-rtol", type=float, default=None)
    cmp.add_argument("--loss-rtol", type=float, default=None)
    cmp.add_argument(
        "--routing-tol", type=float, default=None, help="allowed fraction of tokens choosing other experts"
    )
    cmp.add_argument("--json", action="store_true", help="machine-readable output")


def _model_overrides(overrides: list[str]) -> dict[str, Any]:
    from omegaconf import OmegaConf

    from moe_plugin.align.record import DEFAULT_MODEL

    base = OmegaConf.create({"model": DEFAULT_MODEL})
    for item in overrides:
        if "=" not in item or not item.startswith("model."):
            raise ValueError(f"override {item!r}: expected model.<key>=<value>, e.g. model.hidden_size=128.")
    merged = OmegaConf.merge(base, OmegaConf.from_dotlist(overrides))
    return OmegaConf.to_container(merged.model, resolve=True)  # type: ignore[return-value]


def _run_record(args: argparse.Namespace) -> int:
    from moe_plugin.align.record import RecordConfig, markov_batches, record, save_record

    if args.ops:
        from moe_plugin.align.ops import record_ops

        rec = record_ops(args.precision, args.accelerator, args.threads, args.expert_path, args.seed, args.label)
        save_record(rec, args.out)
        print(f"recorded {len(rec['steps'][0]['forward'])} operators of {rec['label']} to {args.out}")
        return 0

    cfg = RecordConfig(
        steps=args.steps,
        seed=args.seed,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=args.lr,
        precision=args.precision,
        threads=args.threads,
        accelerator=args.accelerator,
        expert_path=args.expert_path,
        model=_model_overrides(args.overrides),
        batches_file=args.batches,
        label=args.label,
    )
    rec = record(cfg)
    save_record(rec, args.out)
    if args.save_batches:
        import torch

        if args.batches:
            batches = torch.load(args.batches, weights_only=True)[: cfg.steps]
        else:
            batches = markov_batches(cfg.steps, cfg.batch_size, cfg.seq_len, int(cfg.model["vocab_size"]), cfg.seed)
        Path(args.save_batches).parent.mkdir(parents=True, exist_ok=True)
        torch.save(batches, args.save_batches)
    losses = " ".join(f"{s['loss']:.5f}" for s in rec["steps"])
    print(f"recorded {len(rec['steps'])} steps of {rec['label']} to {args.out}\nloss: {losses}")
    return 0


def _tolerances(args: argparse.Namespace, a: dict[str, Any], b: dict[str, Any]) -> Any:
    from moe_plugin.align.compare import DEFAULT_TOLERANCES, default_tolerances

    if args.tolerance_dtype is not None:
        if args.tolerance_dtype not in DEFAULT_TOLERANCES:
            raise ValueError(
                f"--tolerance-dtype={args.tolerance_dtype!r}: choose one of {', '.join(DEFAULT_TOLERANCES)}."
            )
        tol = DEFAULT_TOLERANCES[args.tolerance_dtype]
    else:
        tol = default_tolerances(a["env"]["compute_dtype"], b["env"]["compute_dtype"])[1]
    changes = {
        k: v
        for k, v in {
            "forward": args.fwd_rtol,
            "backward": args.bwd_rtol,
            "grads": args.grad_rtol,
            "loss": args.loss_rtol,
            "routing": args.routing_tol,
        }.items()
        if v is not None
    }
    return dataclasses.replace(tol, **changes)


def _run_compare(args: argparse.Namespace) -> int:
    from moe_plugin.align.compare import compare_records, format_comparison
    from moe_plugin.align.plot import plot_losses
    from moe_plugin.align.record import load_record

    a, b = load_record(args.reference), load_record(args.candidate)
    tol = _tolerances(args, a, b)
    cmp = compare_records(a, b, tol)
    if args.tolerance_dtype:
        cmp.dtype = args.tolerance_dtype
    png = None
    if not cmp.problem:
        png = plot_losses(cmp, args.png or Path(args.candidate).with_suffix(".losses.png"))
    if args.json:
        first = cmp.first
        print(
            json.dumps(
                {
                    "status": ["aligned", "diverged", "not comparable"][cmp.exit_code],
                    "problem": cmp.problem,
                    "tolerances": dataclasses.asdict(cmp.tolerances),
                    "first_divergence": None
                    if first is None
                    else {
                        "step": first.step,
                        "point": first.point,
                        "phase": first.phase,
                        "rel_error": first.error.worst_rel,
                    },
                    "first_by_phase": {
                        k: {"step": e.step, "point": e.point, "rel_error": e.error.worst_rel}
                        for k, e in cmp.first_by_phase.items()
                    },
                    "table": cmp.table() if not cmp.problem else [],
                    "losses_a": cmp.losses_a,
                    "losses_b": cmp.losses_b,
                    "png": str(png) if png else None,
                },
                indent=2,
                default=str,
            )
        )
    else:
        print(format_comparison(cmp, a.get("kinds")))
        if png:
            print(f"loss curves: {png}")
    return cmp.exit_code


def _run(args: argparse.Namespace) -> int:
    if args.align_command == "record":
        return _run_record(args)
    return _run_compare(args)


def run(args: argparse.Namespace) -> int:
    """Bad input exits 2 with a one-paragraph message (no traceback)."""
    import sys

    try:
        return _run(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"moe-plugin align: {err}", file=sys.stderr)
        return 2
