"""`align compare A B`: where does run B leave run A?

Order of the search (the migration procedure of the Ling report, PAPER.md section 4): for each step
in order, first the loss, then the forward probe points in execution order (embedding, attention,
router, permute, experts, ..., lm_head), then the backward points in the order backward reaches them
(lm_head first), then the parameter gradients. The first point over tolerance is "the first
divergence". Errors are scale-relative (see fingerprint.py); a point is over tolerance when
    max(max_rel, norm_rel) > rtol   (forward, backward and gradients have separate rtol)
and the loss when |loss_A - loss_B| / |loss_A| > loss_rtol.

Default tolerances come from the lower compute precision of the two runs: bf16 has 8 mantissa bits
(unit roundoff 2^-8 ~ 3.9e-3) and a module output accumulates a few roundings; fp32 has 2^-24 ~ 6e-8,
and run-to-run differences in reduction order (threads, kernels, vendors) reach about 1e-6 relative
after a few layers and grow as the optimiser amplifies them. Backward gets a looser bound than
forward because gradients pass through more operations. Override per run with --fwd-rtol etc.

Exit codes: 0 aligned, 1 diverged, 2 not comparable (different batches, initial weights or model).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from moe_plugin.align.fingerprint import Fingerprint, FingerprintError, compare_fingerprints
from moe_plugin.align.probes import routing_flip_fraction, routing_point

# Points whose token order follows the routing decision.
ROUTED_KINDS = ("permute", "experts", "all_to_all", "all_to_all_back")

EXIT_ALIGNED, EXIT_DIVERGED, EXIT_INCOMPARABLE = 0, 1, 2


@dataclass(frozen=True)
class Tolerances:
    forward: float
    backward: float
    grads: float
    loss: float
    routing: float  # fraction of tokens whose set of top-k experts differs


DEFAULT_TOLERANCES: dict[str, Tolerances] = {
    "fp64": Tolerances(forward=1e-10, backward=1e-9, grads=1e-9, loss=1e-10, routing=0.0),
    "fp32": Tolerances(forward=1e-4, backward=1e-3, grads=1e-3, loss=1e-4, routing=0.01),
    "fp16": Tolerances(forward=1e-2, backward=3e-2, grads=3e-2, loss=1e-2, routing=0.05),
    "bf16": Tolerances(forward=5e-2, backward=1e-1, grads=1e-1, loss=2e-2, routing=0.1),
}
_PRECISION_RANK = ["fp64", "fp32", "fp16", "bf16"]


def default_tolerances(dtype_a: str, dtype_b: str) -> tuple[str, Tolerances]:
    """Tolerances of the less precise of two compute dtypes."""
    worst = max(dtype_a, dtype_b, key=_PRECISION_RANK.index)
    return worst, DEFAULT_TOLERANCES[worst]


@dataclass
class PointError:
    step: int
    point: str
    phase: str  # loss | forward | routing | backward | grads
    error: FingerprintError
    note: str = ""  # e.g. "norm only: routing differs"

    def over(self, tol: Tolerances) -> bool:
        if not self.error.comparable:
            return False
        limit = {
            "forward": tol.forward,
            "backward": tol.backward,
            "grads": tol.grads,
            "loss": tol.loss,
            "routing": tol.routing,
        }[self.phase]
        return not self.error.worst_rel <= limit  # nan/inf count as over


@dataclass
class Comparison:
    label_a: str
    label_b: str
    dtype: str
    tolerances: Tolerances
    steps: int
    losses_a: list[float]
    losses_b: list[float]
    errors: list[PointError] = field(default_factory=list)
    first: PointError | None = None
    first_by_phase: dict[str, PointError] = field(default_factory=dict)
    incomparable: list[str] = field(default_factory=list)  # points whose sizes differ between layouts
    problem: str | None = None  # why the records cannot be compared at all

    @property
    def exit_code(self) -> int:
        if self.problem:
            return EXIT_INCOMPARABLE
        return EXIT_DIVERGED if self.first is not None else EXIT_ALIGNED

    def table(self, step: int | None = None) -> list[dict[str, Any]]:
        """Per probe point and phase: errors at `step` (default: the first divergent step, else the
        last) and the worst relative error over all steps with the step where it first exceeded tolerance."""
        at = step if step is not None else (self.first.step if self.first else self.steps - 1)
        rows: dict[tuple[str, str], dict[str, Any]] = {}
        for e in self.errors:
            key = (e.point, e.phase)
            row = rows.setdefault(
                key,
                {
                    "point": e.point,
                    "phase": e.phase,
                    "max_abs": None,
                    "max_rel": None,
                    "worst_rel_all_steps": 0.0,
                    "first_over_step": None,
                    "note": "",
                },
            )
            if e.step == at:
                row["max_abs"], row["max_rel"], row["note"] = e.error.max_abs, e.error.worst_rel, e.note
            if e.error.comparable:
                row["worst_rel_all_steps"] = (
                    max(row["worst_rel_all_steps"], e.error.worst_rel)
                    if not math.isnan(e.error.worst_rel)
                    else math.inf
                )
            if row["first_over_step"] is None and e.over(self.tolerances):
                row["first_over_step"] = e.step
        return list(rows.values())


def _fp(d: dict[str, Any]) -> Fingerprint:
    return Fingerprint.from_dict(d)


def check_comparable(a: dict[str, Any], b: dict[str, Any]) -> str | None:
    n = min(len(a["batch_hashes"]), len(b["batch_hashes"]))
    if a["batch_hashes"][:n] != b["batch_hashes"][:n]:
        return (
            f"the records used different batches ({a['batches_hash']} vs {b['batches_hash']}). Re-record B with "
            "`--batches <file saved by A's --save-batches>` or the same --seed/--batch-size/--seq-len."
        )
    if a["init_hash"] != b["init_hash"]:
        return f"the records started from different weights ({a['init_hash']} vs {b['init_hash']}): use the same --seed and model overrides."
    if _model_without_path(a) != _model_without_path(b):
        return "the records used different model configurations: record both with the same model overrides."
    return None


def _model_without_path(rec: dict[str, Any]) -> dict[str, Any]:
    """The model configuration minus the expert compute path (which alignment is allowed to vary)."""
    model = json.loads(json.dumps(rec["config"]["model"]))
    model.get("moe", {}).pop("grouped_mm_backend", None)
    return model


def compare_records(a: dict[str, Any], b: dict[str, Any], tolerances: Tolerances | None = None) -> Comparison:
    """Compare record B against reference A (see the module docstring for the order)."""
    dtype, default = default_tolerances(a["env"]["compute_dtype"], b["env"]["compute_dtype"])
    tol = tolerances or default
    steps = min(len(a["steps"]), len(b["steps"]))
    cmp = Comparison(
        label_a=a["label"],
        label_b=b["label"],
        dtype=dtype,
        tolerances=tol,
        steps=steps,
        losses_a=[s["loss"] for s in a["steps"]],
        losses_b=[s["loss"] for s in b["steps"]],
    )
    cmp.problem = check_comparable(a, b)
    if cmp.problem:
        return cmp
    incomparable: set[str] = set()
    kinds: dict[str, str] = a.get("kinds", {})
    routing_errors: dict[str, PointError] = {}
    for i in range(steps):
        sa, sb = a["steps"][i], b["steps"][i]
        loss_rel = abs(sa["loss"] - sb["loss"]) / max(abs(sa["loss"]), 1e-30)
        step_errors = [
            PointError(i, "loss", "loss", FingerprintError(abs(sa["loss"] - sb["loss"]), loss_rel, loss_rel))
        ]
        flipped = set()
        for point, ra in sa.get("routing", {}).items():
            rb = sb.get("routing", {}).get(point)
            if rb is None:
                continue
            frac = routing_flip_fraction(ra, rb)
            if frac != 0:
                flipped.add(point.rsplit(".", 1)[0])
            routing_errors[point] = PointError(
                i, point, "routing", FingerprintError(frac, frac, frac, comparable=frac == frac)
            )
        for phase in ("forward", "backward", "grads"):
            # Reference order is A's execution order; points only one side has are layout-dependent.
            for point, fa in sa[phase].items():
                fb = sb[phase].get(point)
                if fb is None:
                    incomparable.add(point)
                    continue
                err = compare_fingerprints(_fp(fa), _fp(fb))
                note = ""
                if kinds.get(point) in ROUTED_KINDS and point.rsplit(".", 1)[0] in flipped and err.comparable:
                    # Another expert choice reorders the token copies: only the norm is order-independent.
                    err = FingerprintError(err.max_abs, err.norm_rel, err.norm_rel)
                    note = "norm only: routing differs"
                if not err.comparable:
                    incomparable.add(point)
                step_errors.append(PointError(i, point, phase, err, note))
                if phase == "forward" and kinds.get(point) == "router":
                    routed = routing_errors.pop(routing_point(point), None)
                    if routed is not None:
                        step_errors.append(routed)
            incomparable.update(set(sb[phase]) - set(sa[phase]))
        step_errors.extend(routing_errors.values())
        routing_errors.clear()
        cmp.errors.extend(step_errors)
        for e in step_errors:
            if e.over(tol):
                cmp.first_by_phase.setdefault(e.phase, e)
                if cmp.first is None:
                    cmp.first = e
    # The loss comes first in the list, but the module that caused a divergence is more useful:
    # when the loss diverges at a step where a module diverges too, report the module.
    if cmp.first is not None and cmp.first.phase == "loss":
        same_step = [e for e in cmp.errors if e.step == cmp.first.step and e.phase != "loss" and e.over(tol)]
        if same_step:
            cmp.first = same_step[0]
    cmp.incomparable = sorted(incomparable)
    return cmp


def format_comparison(cmp: Comparison, kinds: dict[str, str] | None = None) -> str:
    lines = [f"A: {cmp.label_a}", f"B: {cmp.label_b}"]
    if cmp.problem:
        return "\n".join([*lines, f"NOT COMPARABLE: {cmp.problem}"])
    t = cmp.tolerances
    lines.append(
        f"tolerances ({cmp.dtype}): forward {t.forward:g}, backward {t.backward:g}, grads {t.grads:g}, loss {t.loss:g} "
        f"(scale-relative), routing {t.routing:g} (fraction of tokens choosing other experts)"
    )
    if cmp.first is None:
        lines.append(f"ALIGNED: {cmp.steps} steps, every probe point within tolerance.")
    else:
        f = cmp.first
        kind = f" ({kinds[f.point]})" if kinds and f.point in kinds else ""
        lines.append(
            f"DIVERGED at step {f.step}, {f.phase} of {f.point}{kind}: relative error {f.error.worst_rel:.3g} "
            f"(max abs {f.error.max_abs:.3g})"
        )
        flips = [e for e in cmp.errors if e.step == f.step and e.phase == "routing" and e.error.worst_rel > 0]
        if flips and f.phase != "routing":
            where = ", ".join(f"{e.point} {e.error.worst_rel:.1%}" for e in flips)
            lines.append(
                f"  routing already differed at step {f.step} ({where} of tokens chose other experts): those tokens'"
                " outputs differ by O(1), so look at what changed the router input first."
            )
        for phase in ("loss", "forward", "routing", "backward", "grads"):
            e = cmp.first_by_phase.get(phase)
            if e is not None:
                lines.append(f"  first {phase:8s} over tolerance: step {e.step}, {e.point} ({e.error.worst_rel:.3g})")
    at = cmp.first.step if cmp.first else cmp.steps - 1
    lines.append("")
    lines.append(
        f"{'point':34s} {'phase':8s} {'max_abs@' + str(at):>12s} {'rel@' + str(at):>10s} {'worst_rel':>10s} {'first_over':>10s}"
    )
    for row in cmp.table(at):
        if row["phase"] == "grads" and row["first_over_step"] is None and row["point"] != _worst_grad(cmp, at):
            continue  # keep the table short: parameter gradients only when they matter
        lines.append(
            f"{row['point'][:34]:34s} {row['phase']:8s} {_g(row['max_abs']):>12s} {_g(row['max_rel']):>10s} "
            f"{_g(row['worst_rel_all_steps']):>10s} {('-' if row['first_over_step'] is None else str(row['first_over_step'])):>10s}"
            + (f"  {row['note']}" if row["note"] else "")
        )
    if cmp.incomparable:
        lines.append(f"layout-dependent points (sizes differ, not compared): {', '.join(cmp.incomparable)}")
    lines.append("")
    lines.append("loss A: " + " ".join(f"{x:.5f}" for x in cmp.losses_a[: cmp.steps]))
    lines.append("loss B: " + " ".join(f"{x:.5f}" for x in cmp.losses_b[: cmp.steps]))
    return "\n".join(lines)


def _worst_grad(cmp: Comparison, step: int) -> str | None:
    grads = [e for e in cmp.errors if e.step == step and e.phase == "grads" and e.error.comparable]
    return max(grads, key=lambda e: e.error.worst_rel).point if grads else None


def _g(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"
