"""Stochastic Routing Warmup (Ling, arXiv 2503.05139, section "Stochastic Routing Warmup").

Shapes: T tokens, E experts, L warmup layers.

For warmup step i (the number of ACCEPTED optimizer steps so far) and W warmup steps:

    a        = min(i / W, 1)
    s'_TE    = a * s_TE + (1 - a) * (mu + sigma * eps_TE)

s are the router logits and eps_TE is standard normal noise. mu / sigma are running statistics of all
logits (over tokens and experts), an exponential moving average with momentum m over optimizer steps:

    n, S1, S2  = count, sum and sum of squares of the logits of the step's GLOBAL batch
                 (every micro-batch, summed over the data-parallel ranks; float64)
    mean = S1 / n,   std = sqrt((S2 - n * mean^2) / (n - 1))
    mu    <- m * mu    + (1 - m) * mean          (first committed step: mu = mean, sigma = std)
    sigma <- m * sigma + (1 - m) * std

The statistics are scalars on purpose: the random part must be identically distributed across experts,
otherwise a router that starts (or drifts) with a per-expert offset would keep routing to the same
experts during warmup (tests/unit/layers/test_routing_warmup.py shows per-expert statistics failing).
Before the first committed step (step 0) there are no statistics yet: the noise then has the moments of
the current micro-batch's logits, summed over ranks by `NoiseKeys.reduce` when one is set.

At step 0 routing is random at the logits' own scale, so expert load is balanced and a hot expert
cannot exhaust memory in dropless mode; control then moves linearly to the learned router. From step W
on (and in eval mode) the learned logits are returned unchanged, bit for bit. The paper leaves W and the
statistics' granularity open: W is required, statistics are scalars, m defaults to 0.99.

The warmup is part of the optimizer step (exactness):
- The step's moments are only staged during forwards; `commit_routing_warmup(model, accepted, reduce)`
  (the RouterUpdates callback calls it once per optimizer step) folds them into mu / sigma and advances i
  only when the update was applied. A step the loss-spike guard rejects changes nothing here, so its retry
  routes exactly like a clean step. Activation-checkpoint recomputation (inside backward) stages nothing.
- eps is not drawn from a torch generator (per process, so it would depend on the layout) but computed
  by a counter-based hash of its keys, elementwise in int64 (splitmix64's finaliser, Steele et al. 2014):

      h    = mix(mix(mix(mix(seed*G) + i*G) + layer*G) + t*G)             t = global token index
      h_TE = mix(h_T + (e + 1) * G)                                      e = expert index
      u1, u2 = (high 32 bits + 1/2) / 2^32,  (low 32 bits + 1/2) / 2^32  in (0, 1)
      eps_TE = sqrt(-2 ln u1) * cos(2 pi u2)                             (Box-Muller, float64 -> float32)

  with G = 0x9E3779B97F4A7C15 and t = first_sample * S + (local token index), S tokens per sample and
  first_sample the global position of this rank's first sample in the optimizer step's batch (set from
  outside through `set_noise_keys`; the data sampler decides it). The same global batch therefore gets the
  same noise on any number of ranks, expert-parallel size or gradient-accumulation split.

The step i and the statistics are buffers, so they are checkpointed and resume at any layout.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

GOLDEN = 0x9E3779B97F4A7C15  # 2^64 / golden ratio: splitmix64's increment
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
_MASK64 = (1 << 64) - 1


def in_backward() -> bool:
    """True while autograd runs a backward pass, where activation checkpointing recomputes forwards."""
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1


# --------------------------------------------------------------------------------- counter-based noise
def _signed(c: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits (torch has no uint64 arithmetic)."""
    c &= _MASK64
    return c - (1 << 64) if c >= 1 << 63 else c


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's >> is arithmetic: it copies the sign bit)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors, elementwise: a bijection of the 64 bits (products wrap)."""
    x = (x ^ _shr(x, 30)) * _signed(_MIX1)
    x = (x ^ _shr(x, 27)) * _signed(_MIX2)
    return x ^ _shr(x, 31)


def mix64_int(x: int) -> int:
    """The same finaliser on a Python int (exact, unsigned); the reference the tensor version is tested on."""
    x &= _MASK64
    x = ((x ^ (x >> 30)) * _MIX1) & _MASK64
    x = ((x ^ (x >> 27)) * _MIX2) & _MASK64
    return x ^ (x >> 31)


def key_prefix(seed: int, step: int, layer: int) -> int:
    """The hash state after absorbing the scalar keys (seed, step, layer), as an unsigned int."""
    h = mix64_int(seed * GOLDEN)
    h = mix64_int(h + step * GOLDEN)
    return mix64_int(h + layer * GOLDEN)


def keyed_normal(seed: int, step: int, layer: int, token_index_T: torch.Tensor, num_experts: int) -> torch.Tensor:
    """eps_TE ~ N(0, 1), float32, a pure function of (seed, step, layer, token index, expert index).

    token_index_T: int64 global token indices. Elementwise only, so a token's noise does not depend on which
    other tokens share the tensor (how the batch is split over ranks and micro-batches).
    """
    prefix = _signed(key_prefix(seed, step, layer))
    h_T = mix64(token_index_T.to(torch.int64) * _signed(GOLDEN) + prefix)
    experts_E = (torch.arange(num_experts, device=token_index_T.device, dtype=torch.int64) + 1) * _signed(GOLDEN)
    h_TE = mix64(h_T[:, None] + experts_E[None, :])
    u1 = (_shr(h_TE, 32).double() + 0.5) * 2.0**-32
    u2 = ((h_TE & 0xFFFFFFFF).double() + 0.5) * 2.0**-32
    # float64 then rounded: vectorised and scalar log/cos may differ in the last float64 bit, which almost
    # never survives the rounding to float32 (so noise is bit-identical wherever a token sits in the tensor)
    return (torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)).float()


@dataclass
class NoiseKeys:
    """Keys of the warmup noise that only the training loop knows, set before each micro-batch.

    seed: the run's seed. first_sample: global position (within the optimizer step's batch, all ranks and
    micro-batches) of this rank's first sample. reduce: sums a tensor over the ranks that share the router
    (the data-parallel replicas), None = one process; used for the step-0 moments of the micro-batch.
    """

    seed: int = 0
    first_sample: int = 0
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None


# ------------------------------------------------------------------------------------------ module
class StochasticRoutingWarmup(nn.Module):
    def __init__(self, num_experts: int, warmup_steps: int, momentum: float = 0.99) -> None:
        super().__init__()
        if not isinstance(warmup_steps, int) or warmup_steps < 1:
            raise ValueError(
                f"routing_warmup_steps={warmup_steps!r} must be a positive integer when the routing warmup is on "
                "(the paper's W); set e.g. model.moe.routing_warmup_steps=100, or routing_warmup=false."
            )
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"routing_warmup_momentum={momentum} must be in [0, 1).")
        self.warmup_steps = warmup_steps
        self.momentum = momentum
        self.num_experts = num_experts
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("logit_mean", torch.zeros(()))
        self.register_buffer("logit_std", torch.ones(()))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        # The step's staged moments [n, S1, S2] and the step-0 moments of the last micro-batch: scratch that
        # is not checkpointed (a checkpoint is taken between steps, where both are empty).
        self.register_buffer("pending_moments", torch.zeros(3, dtype=torch.float64), persistent=False)
        self.register_buffer("first_moments", torch.zeros(3, dtype=torch.float64), persistent=False)
        self.layer_index = 0  # position among the model's warmup layers (set_noise_keys)
        self.keys = NoiseKeys()
        # Host copies of `step` and `num_updates`: the forward must not read device tensors (a sync).
        self._step_host: int | None = None
        self._updates_host: int | None = None

    def set_step(self, step: int) -> None:
        """Set i directly (a training loop of one's own; RouterUpdates counts accepted steps instead)."""
        self.step.fill_(int(step))
        self._step_host = int(step)

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super()._load_from_state_dict(*args, **kwargs)
        self._step_host = self._updates_host = None  # re-read the restored buffers on next use

    def _host_step(self) -> int:
        if self._step_host is None:
            self._step_host = int(self.step)
        return self._step_host

    def _host_updates(self) -> int:
        if self._updates_host is None:
            self._updates_host = int(self.num_updates)
        return self._updates_host

    def blend(self) -> float:
        """a = min(i / W, 1)."""
        return min(self._host_step() / self.warmup_steps, 1.0)

    @property
    def active(self) -> bool:
        """The warmup still changes the logits (a < 1): its statistics are staged and committed."""
        return self.blend() < 1.0

    # ------------------------------------------------------------------------------ statistics
    @staticmethod
    def moments(logits_TE: torch.Tensor) -> torch.Tensor:
        """[n, sum, sum of squares] of the logits, float64 (sums add exactly enough across ranks)."""
        x = logits_TE.detach().double()
        return torch.stack([x.new_tensor(float(x.numel())), x.sum(), (x * x).sum()])

    @staticmethod
    def mean_std(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, s1, s2 = m[0], m[1], m[2]
        mean = s1 / n.clamp_min(1.0)
        var = ((s2 - n * mean * mean) / (n - 1.0).clamp_min(1.0)).clamp_min(0.0)
        return mean.float(), var.sqrt().float()

    @torch.no_grad()
    def commit(self, step_moments: torch.Tensor | None, accepted: bool = True) -> None:
        """End of an optimizer step: fold the step's moments (summed over ranks) into mu / sigma and advance i
        if the update was applied; otherwise forget them. Either way the staged moments are cleared."""
        self.pending_moments.zero_()
        if not accepted:
            return
        if step_moments is not None and float(step_moments[0]) >= 2:
            mean, std = self.mean_std(step_moments.to(self.pending_moments))
            if self._host_updates() == 0:
                self.logit_mean.copy_(mean)
                self.logit_std.copy_(std)
            else:
                self.logit_mean.lerp_(mean.to(self.logit_mean), 1.0 - self.momentum)
                self.logit_std.lerp_(std.to(self.logit_std), 1.0 - self.momentum)
            self.num_updates += 1
            self._updates_host = self._host_updates() + 1
        self.set_step(self._host_step() + 1)

    # ------------------------------------------------------------------------------------ forward
    def forward(self, logits_TE: torch.Tensor, tokens_per_sample: int | None = None) -> torch.Tensor:
        """logits_TE: router logits; tokens_per_sample: S, the sequence length of the [B, S] batch they came
        from (None: the T tokens are one sample)."""
        if not self.training:
            return logits_TE
        a = self.blend()
        if a >= 1.0:
            return logits_TE
        recompute = in_backward()  # a checkpoint recompute must neither stage nor reduce again
        if not recompute:
            m = self.moments(logits_TE)
            self.pending_moments += m
            if self._host_updates() == 0:
                self.first_moments.copy_(self.keys.reduce(m) if self.keys.reduce is not None else m)
        if self._host_updates() == 0:
            mu, sigma = self.mean_std(self.first_moments)
        else:
            mu, sigma = self.logit_mean, self.logit_std
        T = logits_TE.shape[0]
        S = tokens_per_sample or T
        token_T = self.keys.first_sample * S + torch.arange(T, device=logits_TE.device, dtype=torch.int64)
        noise_TE = keyed_normal(self.keys.seed, self._host_step(), self.layer_index, token_T, self.num_experts)
        random_TE = mu.to(logits_TE) + sigma.to(logits_TE) * noise_TE.to(logits_TE)
        return a * logits_TE + (1.0 - a) * random_TE

    def extra_repr(self) -> str:
        return f"warmup_steps={self.warmup_steps}, momentum={self.momentum}"


# ------------------------------------------------------------------------------- model-level helpers
def routing_warmups(model: nn.Module) -> list[StochasticRoutingWarmup]:
    """Every routing-warmup module of `model`, in module order (the layer index of the noise keys)."""
    return [m for m in model.modules() if isinstance(m, StochasticRoutingWarmup)]


def set_noise_keys(model: nn.Module, keys: NoiseKeys) -> None:
    """Give every warmup layer of `model` this micro-batch's noise keys and its layer index."""
    for i, w in enumerate(routing_warmups(model)):
        w.layer_index = i
        w.keys = keys


@torch.no_grad()
def commit_routing_warmup(
    model: nn.Module, accepted: bool = True, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> None:
    """End an optimizer step for every warmup layer of `model` (see StochasticRoutingWarmup.commit).

    reduce: sums a tensor over the data-parallel ranks (None = one process); called once, with the staged
    moments of all active layers stacked [L, 3], and only while some layer is active, which every rank
    agrees on (i is the same everywhere). Call it on every rank, also for rejected steps (accepted=False).
    """
    warmups = routing_warmups(model)
    active = [w for w in warmups if w.active]
    if accepted and active:
        pending_L3 = torch.stack([w.pending_moments for w in active])
        summed_L3 = reduce(pending_L3) if reduce is not None else pending_L3
        for w, m in zip(active, summed_L3):
            w.commit(m, accepted=True)
    for w in warmups:
        if w not in active or not accepted:
            w.commit(None, accepted=accepted)
