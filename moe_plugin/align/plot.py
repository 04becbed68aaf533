"""Loss curves of two alignment records side by side, plus their difference, as a PNG."""

from __future__ import annotations

from pathlib import Path

from moe_plugin.align.compare import Comparison


def plot_losses(cmp: Comparison, path: str | Path) -> Path:
    """Left: both loss curves. Right: |loss_B - loss_A| / loss_A per step (log scale), with the loss tolerance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = cmp.steps
    steps = list(range(n))
    a, b = cmp.losses_a[:n], cmp.losses_b[:n]
    rel = [abs(y - x) / max(abs(x), 1e-30) for x, y in zip(a, b)]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(steps, a, marker="o", label=f"A: {cmp.label_a}")
    left.plot(steps, b, marker="x", linestyle="--", label=f"B: {cmp.label_b}")
    left.set_xlabel("step")
    left.set_ylabel("training loss")
    left.legend(fontsize=7)
    left.set_title("loss")
    right.semilogy(steps, [max(r, 1e-12) for r in rel], marker="o", label="|B - A| / A")
    right.axhline(cmp.tolerances.loss, color="red", linestyle=":", label=f"loss tolerance ({cmp.dtype})")
    if cmp.first is not None:
        right.axvline(cmp.first.step, color="gray", linestyle="--", label=f"first divergence: {cmp.first.point}")
    right.set_xlabel("step")
    right.set_title("relative loss difference")
    right.legend(fontsize=7)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
