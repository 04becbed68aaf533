"""Mixture-of-Experts feed-forward layer.

Shapes: T tokens, D hidden, E experts (global), K experts per token, N token copies (T*K when
dropless), M copies computed by this rank's experts, L local experts.

forward(x) reads like the algorithm:
    1. route:    router(x_TD) -> logits_TE, scores_TE, probs_TK, topk_ids_TK          (router.py)
    2. permute:  group token copies by expert id (capacity drops here) -> x_ND        (permute.py)
    3. dispatch: hand copies to the ranks that hold their experts -> x_MD              (dispatch/)
    4. experts:  each expert's SwiGLU on its copies, through the grouped-matmul seam   (experts.py)
    5. combine:  bring outputs back (inverse of 3), weight by probs and sum per token (inverse of 2)
    6. shared:   add the shared experts' output, optionally gated by sigmoid(x @ w_shared_gate)

Auxiliary losses (losses.py): after each forward the layer keeps
    aux_loss = aux_loss_coef * L_balance + z_loss_coef * L_z
with a graph, and `collect_aux_losses(model)` sums them over a model for the training loss. L_balance is
per micro-batch (Switch), per sequence (DeepSeek-V3) or per global batch (counts summed over the
optimizer step's micro-batches and, through `count_reduce`, over data-parallel ranks). When
`count_reduce` is set (expert parallelism sets it), the micro-batch loss also uses counts summed over
ranks: the loss of the global micro-batch, equal to one process's on the same global batch.

Routing statistics (routing_stats.py) live in `moe.stats`, a RoutingStats: the last forward's counts and
losses by reference (no extra op), the optimizer step's counts and running totals only while something
tracks them (the layer's own global-batch loss and expert bias, the ExpertLoad callback).

Hooks set from outside, never read from global state:
    dispatcher:  a layers.dispatcher.TokenDispatcher; LocalDispatcher (every expert here) by default,
                 expert parallelism installs dispatch.AllToAllDispatcher
    count_reduce: callable summing a count tensor over the data-parallel group (None = single process)
    fuse_local_routing: True runs steps 2-5 as one fused node (experts.local_routed, kernels/local_moe.py)
                 when routing is dropless, the dispatcher is the plain LocalDispatcher and the experts' backend
                 is the fused CPU SwiGLU node; False (default: not faster on CPU) keeps the separate steps
`start_step()` (called by the RouterUpdates callback before each optimizer step's first micro-batch)
opens a new counting window for the global-batch loss and expert bias; the routing warmup counts its own
accepted steps (routing_warmup.commit_routing_warmup), `start_step(step)` sets that count instead.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn

from moe_plugin.layers.dispatcher import LocalDispatcher, TokenDispatcher
from moe_plugin.layers.experts import GroupedExperts
from moe_plugin.layers.feed_forward import FeedForward
from moe_plugin.layers.losses import (
    load_balancing_loss,
    router_z_loss,
    sequence_load_balancing_loss,
)
from moe_plugin.layers.permute import DROP_POLICIES, Permutation, expert_capacity, permute, sort_by_expert, unpermute
from moe_plugin.layers.router import RouterOutput, TopKRouter
from moe_plugin.layers.routing_stats import RoutingStats
from moe_plugin.layers.routing_warmup import in_backward

BALANCE_LOSS_TYPES = ("micro_batch", "sequence", "global_batch")


class MoE(nn.Module):
    """Routed experts + optional shared experts. Dropless by default. See the module docstring."""

    def __init__(
        self,
        hidden_size: int,
        num_experts: int = 8,
        top_k: int = 2,
        expert_hidden_size: int = 512,
        num_shared_experts: int = 0,
        shared_expert_hidden_size: int | None = None,
        shared_expert_gate: bool = False,
        norm_topk_prob: bool = True,
        aux_loss_coef: float = 0.015,
        z_loss_coef: float = 1e-4,
        score_func: str = "softmax",
        routing_scale: float = 1.0,
        num_expert_groups: int = 1,
        topk_groups: int = 1,
        expert_bias: bool = False,
        expert_bias_update_rate: float = 1e-3,
        router_jitter: float = 0.0,
        routing_warmup: bool = False,
        routing_warmup_steps: int | None = None,
        routing_warmup_momentum: float = 0.99,
        balance_loss_type: str = "micro_batch",
        capacity_factor: float | None = None,
        drop_policy: str = "probs",
        grouped_mm_backend: str = "auto",
    ) -> None:
        super().__init__()
        if balance_loss_type not in BALANCE_LOSS_TYPES:
            raise ValueError(f"model.moe.balance_loss_type={balance_loss_type!r} must be one of {BALANCE_LOSS_TYPES}.")
        if capacity_factor is not None and capacity_factor <= 0:
            raise ValueError(f"model.moe.capacity_factor={capacity_factor} must be > 0, or null for dropless routing.")
        if drop_policy not in DROP_POLICIES:
            raise ValueError(f"model.moe.drop_policy={drop_policy!r} must be one of {DROP_POLICIES}.")
        if routing_warmup and routing_warmup_steps is None:
            raise ValueError(
                "model.moe.routing_warmup=true needs model.moe.routing_warmup_steps (the warmup length W in "
                "optimizer steps, e.g. 100); the paper leaves W open so there is no default."
            )
        if aux_loss_coef < 0 or z_loss_coef < 0 or expert_bias_update_rate < 0:
            raise ValueError(
                f"model.moe.aux_loss_coef={aux_loss_coef}, z_loss_coef={z_loss_coef} and "
                f"expert_bias_update_rate={expert_bias_update_rate} must be >= 0."
            )
        if num_shared_experts < 0:
            raise ValueError(f"model.moe.num_shared_experts={num_shared_experts} must be >= 0.")
        self.num_experts = num_experts
        self.top_k = top_k
        self.aux_loss_coef = aux_loss_coef
        self.z_loss_coef = z_loss_coef
        self.score_func = score_func
        self.balance_loss_type = balance_loss_type
        self.capacity_factor = capacity_factor
        self.drop_policy = drop_policy
        self.expert_bias_update_rate = expert_bias_update_rate

        self.router = TopKRouter(
            hidden_size,
            num_experts,
            top_k,
            norm_topk_prob=norm_topk_prob,
            score_func=score_func,
            routing_scale=routing_scale,
            num_expert_groups=num_expert_groups,
            topk_groups=topk_groups,
            expert_bias=expert_bias,
            jitter=router_jitter,
            routing_warmup_steps=routing_warmup_steps if routing_warmup else None,
            routing_warmup_momentum=routing_warmup_momentum,
        )
        self.experts = GroupedExperts(num_experts, hidden_size, expert_hidden_size, grouped_mm_backend)
        # Several shared experts are one SwiGLU MLP of summed width (DeepSeekMoE, Ling).
        shared_width = num_shared_experts * (shared_expert_hidden_size or expert_hidden_size)
        self.shared_experts = FeedForward(hidden_size, shared_width) if num_shared_experts > 0 else None
        self.shared_expert_gate = (
            nn.Linear(hidden_size, 1, bias=False) if (shared_expert_gate and self.shared_experts) else None
        )

        self.dispatcher: TokenDispatcher = LocalDispatcher(num_experts)
        self.count_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
        # Off by default: measured slower on CPU than the separate steps (docs/performance.md, issue 15 fourth pass).
        self.fuse_local_routing = False
        self.aux_loss: torch.Tensor | None = None
        self.stats = RoutingStats(num_experts)
        # The layer's own math reads the step window: the global-batch loss and the expert-bias update.
        self.stats.track_step = balance_loss_type == "global_batch" or expert_bias
        self._driven = False
        self._warned_undriven = False

    # ----------------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x_TD = x.reshape(-1, shape[-1])
        out_TD = self._routed(x_TD, shape)
        if self.shared_experts is not None:
            out_TD = out_TD + self._shared(x_TD)
        return out_TD.reshape(shape)

    # Runs eagerly inside a torch.compile'd block (parallel/compile.py): the expert counts are data-dependent
    # (one host sync sizes the per-expert GEMMs and the all-to-all splits) and the statistics are Python
    # state, so the compiled graph breaks here instead of recompiling for every routing.
    @torch.compiler.disable
    def _routed(self, x_TD: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """route -> permute -> dispatch -> experts -> combine (steps 1-5), then the losses and statistics."""
        routing = self.router(x_TD, shape[-2] if len(shape) >= 3 else None)
        capacity = self._capacity(x_TD.shape[0])
        self._check_dispatcher()
        if self._fused_local(x_TD, capacity):
            # Steps 2-5 as one node: per expert gather -> SwiGLU -> weighted scatter-add, no x_ND/y_ND arrays.
            perm = sort_by_expert(routing.topk_ids_TK, self.num_experts)
            s = perm.state
            out_TD = self.experts.local_routed(
                x_TD, routing.probs_TK, s.order_N, s.token_idx_N, perm.tokens_per_expert_E
            )
            self._record(routing, perm, shape)
            return out_TD
        permuted = permute(x_TD, routing.topk_ids_TK, self.num_experts, routing.probs_TK, capacity, self.drop_policy)
        x_MD, tokens_per_local_expert_L = self.dispatcher.dispatch(permuted.x_ND, permuted.tokens_per_expert_E)
        y_MD = self.experts(x_MD, tokens_per_local_expert_L)
        y_ND = self.dispatcher.combine(y_MD)
        out_TD = unpermute(y_ND, routing.probs_TK, permuted.state)
        self._record(routing, permuted, shape)
        return out_TD

    def _fused_local(self, x_TD: torch.Tensor, capacity: int | None) -> bool:
        """Dropless, every expert here (the plain LocalDispatcher) and experts that can fuse the permutation."""
        return (
            self.fuse_local_routing
            and capacity is None
            and type(self.dispatcher) is LocalDispatcher
            and self.experts.fuses_local_routing(x_TD)
        )

    def _capacity(self, num_tokens: int) -> int | None:
        if self.capacity_factor is None:
            return None
        return expert_capacity(num_tokens, self.top_k, self.num_experts, self.capacity_factor)

    def _check_dispatcher(self) -> None:
        d, ex = self.dispatcher, self.experts
        if d.num_local_experts != ex.num_experts or d.local_expert_offset != ex.expert_offset:
            raise RuntimeError(
                f"dispatcher serves local experts [{d.local_expert_offset}, {d.local_expert_offset + d.num_local_experts}) "
                f"but moe.experts holds [{ex.expert_offset}, {ex.expert_offset + ex.num_experts}); expert parallelism "
                "must install a matching dispatcher (moe_plugin.parallel.apply_expert_parallel does)."
            )

    def _shared(self, x_TD: torch.Tensor) -> torch.Tensor:
        shared_TD = self.shared_experts(x_TD)  # type: ignore[misc]
        if self.shared_expert_gate is not None:
            shared_TD = torch.sigmoid(self.shared_expert_gate(x_TD)) * shared_TD
        return shared_TD

    # ------------------------------------------------------------------------------ losses and stats
    def _record(self, routing: RouterOutput, permuted: Permutation, shape: torch.Size) -> None:
        routed_E = permuted.routed_tokens_per_expert_E
        # Activation-checkpoint recomputation (inside backward) computes the same tensors, so the saved
        # tensors match, but must not count the tokens a second time.
        counting = self.training and torch.is_grad_enabled() and not in_backward()
        if counting:
            self._warn_if_undriven()
            if self.stats.track_step:  # before the loss: the global-batch loss includes this micro-batch
                self.stats.add_to_step(routed_E)

        scores_TE = routing.scores_TE
        if self.score_func == "sigmoid":  # balance and entropy need a distribution over experts
            scores_TE = scores_TE / scores_TE.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        balance = self._balance_loss(scores_TE, routing.topk_ids_TK, routed_E, shape)
        z = router_z_loss(routing.logits_TE)
        self.aux_loss = self.aux_loss_coef * balance + self.z_loss_coef * z
        num_copies = routing.topk_ids_TK.numel()
        self.stats.record(routed_E, permuted.tokens_per_expert_E, num_copies, balance, z, scores_TE, counting)

    def _balance_loss(
        self, scores_TE: torch.Tensor, topk_ids_TK: torch.Tensor, routed_E: torch.Tensor, shape: torch.Size
    ) -> torch.Tensor:
        if self.balance_loss_type == "sequence":
            S = shape[-2] if len(shape) >= 3 else scores_TE.shape[0]
            return sequence_load_balancing_loss(
                scores_TE.reshape(-1, S, self.num_experts), topk_ids_TK.reshape(-1, S, self.top_k)
            )
        counts_E = routed_E
        if self.balance_loss_type == "global_batch":
            if self.training and torch.is_grad_enabled() and self.stats.step_tokens_per_expert_E is not None:
                counts_E = self.stats.step_tokens_per_expert_E
        if self.count_reduce is not None:
            # summed over data-parallel ranks: the micro-batch loss of the GLOBAL micro-batch (what one
            # process computes on the same global batch), or the global-batch loss
            counts_E = self.count_reduce(counts_E)
        return load_balancing_loss(scores_TE, counts_E)

    def _warn_if_undriven(self) -> None:
        needs_driver = (
            self.router.warmup is not None
            or self.router.expert_bias_E is not None
            or self.balance_loss_type == "global_batch"
        )
        if needs_driver and not self._driven and not self._warned_undriven:
            self._warned_undriven = True
            warnings.warn(
                "MoE routing warmup, expert bias or the global-batch balance loss is on, but nothing calls "
                "start_step() before optimizer steps: add moe_plugin.lightning.callbacks.RouterUpdates() to the "
                "Trainer's callbacks (it is in conf/callbacks/default.yaml), or call moe_start_step(model, step).",
                stacklevel=3,
            )

    # --------------------------------------------------------------------------- step-level control
    def start_step(self, step: int | None = None) -> None:
        """Begin an optimizer step: open a new counting window; `step` sets the routing-warmup step (None keeps
        the warmup's own count of accepted steps, advanced by routing_warmup.commit_routing_warmup)."""
        self._driven = True
        if self.router.warmup is not None and step is not None:
            self.router.warmup.set_step(step)
        self.stats.start_step()


def moe_layers(model: nn.Module) -> list[MoE]:
    """Every MoE layer of a model, in module order (works on any nn.Module, users' models included)."""
    return [m for m in model.modules() if isinstance(m, MoE)]


def collect_aux_losses(model: nn.Module) -> torch.Tensor | None:
    """Sum of the coefficient-weighted auxiliary losses of every MoE layer's last forward."""
    losses = [m.aux_loss for m in moe_layers(model) if m.aux_loss is not None]
    return torch.stack(losses).sum() if losses else None


def moe_start_step(model: nn.Module, step: int | None = None) -> None:
    """Call `start_step(step)` on every MoE layer (what the RouterUpdates callback does)."""
    for layer in moe_layers(model):
        layer.start_step(step)
