"""Routing statistics of one MoE layer, kept beside the math (`MoE.stats`) for callbacks to read.

Shapes: T tokens, E experts.

Detached tensors only, never a host sync. What a forward costs depends on who reads:

    last forward (always; references to tensors the forward computed anyway, no extra op):
        tokens_per_expert_E   routed copies per expert (before capacity drops)
        kept_per_expert_E     copies the experts computed
        dropped               routed - kept copies (computed on read; 0 when dropless)
        num_copies            T*K
        losses                {balance_loss, z_loss, router_entropy}, unscaled; the entropy
                              H = mean_t -sum_e p_te log p_te is computed on first read
    step window (routed copies since `start_step()`, one E-sized add per training forward), kept only
    while `track_step` is on: the layer turns it on for its global-batch balance loss and expert bias
    (RouterUpdates reads it for the bias update):
        step_tokens_per_expert_E
    running totals over training forwards (three small adds), only while `track_totals` is on: the
    ExpertLoad callback turns it on at train start and diffs the totals per logging window:
        total_tokens_per_expert_E, total_dropped, total_copies

Plain attributes, not buffers: DDP would overwrite buffers with rank 0's values every forward, and these
counts are per rank (callbacks reduce them).
"""

from __future__ import annotations

import torch

from moe_plugin.layers.losses import router_entropy


class RoutingStats:
    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts
        self.track_step = False
        self.track_totals = False
        self.tokens_per_expert_E: torch.Tensor | None = None
        self.kept_per_expert_E: torch.Tensor | None = None
        self.num_copies = 0
        self._dropless = True
        self.step_tokens_per_expert_E: torch.Tensor | None = None
        self.total_tokens_per_expert_E: torch.Tensor | None = None
        self.total_dropped: torch.Tensor | None = None
        self.total_copies = 0
        self._balance: torch.Tensor | None = None
        self._z: torch.Tensor | None = None
        self._scores_TE: torch.Tensor | None = None
        self._losses: dict[str, torch.Tensor] | None = None

    # ------------------------------------------------------------------------------- written by MoE
    def record(
        self,
        routed_E: torch.Tensor,
        kept_E: torch.Tensor,
        num_copies: int,
        balance: torch.Tensor,
        z: torch.Tensor,
        scores_TE: torch.Tensor,
        counting: bool,
    ) -> None:
        """Keep the last forward's statistics; with `counting` (a training forward, not an activation
        checkpoint's recompute) add to the running totals when tracked. The step window is added to
        separately (`add_to_step`), before the loss that reads it."""
        self._dropless = kept_E is routed_E  # permute returns the same tensor when nothing can drop
        self.tokens_per_expert_E = routed_E.detach()
        self.kept_per_expert_E = kept_E.detach()
        self.num_copies = num_copies
        self._balance, self._z, self._scores_TE = balance.detach(), z.detach(), scores_TE.detach()
        self._losses = None
        if counting and self.track_totals:
            routed = self.tokens_per_expert_E
            dropped = self.dropped
            self.total_tokens_per_expert_E = (
                routed.clone() if self.total_tokens_per_expert_E is None else self.total_tokens_per_expert_E + routed
            )
            self.total_dropped = dropped.clone() if self.total_dropped is None else self.total_dropped + dropped
            self.total_copies += num_copies

    def add_to_step(self, routed_E: torch.Tensor) -> None:
        """Add one training forward's routed copies to the step window (MoE does, when track_step is on)."""
        prev = self.step_tokens_per_expert_E
        self.step_tokens_per_expert_E = routed_E.clone() if prev is None else prev + routed_E

    def start_step(self) -> None:
        """Open a new step window (called by MoE.start_step before an optimizer step's first micro-batch)."""
        self.step_tokens_per_expert_E = None

    def clear(self) -> None:
        """Forget the last forward (a probe that is not a training step leaves nothing behind)."""
        self.tokens_per_expert_E = self.kept_per_expert_E = None
        self._balance = self._z = self._scores_TE = None
        self._losses = None
        self.num_copies = 0

    # ---------------------------------------------------------------------------------- read by callbacks
    @property
    def dropped(self) -> torch.Tensor | None:
        """Copies dropped by the capacity in the last forward (a 0-d tensor)."""
        if self.tokens_per_expert_E is None or self.kept_per_expert_E is None:
            return None
        if self._dropless:  # nothing to compute
            return torch.zeros((), dtype=self.tokens_per_expert_E.dtype, device=self.tokens_per_expert_E.device)
        return self.tokens_per_expert_E.sum() - self.kept_per_expert_E.sum()

    @property
    def losses(self) -> dict[str, torch.Tensor]:
        """{balance_loss, z_loss, router_entropy} of the last forward (empty before the first)."""
        if self._losses is None:
            if self._balance is None or self._z is None or self._scores_TE is None:
                return {}
            with torch.no_grad():
                entropy = router_entropy(self._scores_TE)
            self._losses = {"balance_loss": self._balance, "z_loss": self._z, "router_entropy": entropy}
            self._scores_TE = None  # not needed any more: do not keep T x E scores alive
        return self._losses

    def __repr__(self) -> str:
        return (
            f"RoutingStats(num_experts={self.num_experts}, track_step={self.track_step}, "
            f"track_totals={self.track_totals})"
        )
