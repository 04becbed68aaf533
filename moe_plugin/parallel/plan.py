"""Memory and time model of a training layout: which (EP, shard, replicate, checkpointing, micro-batch)
fits a device, and how fast it runs. The engine behind `moe-plugin plan` (docs/planning.md).

Vocabulary: W devices, EP expert-parallel size, S dense shard size (FSDP2), R = W / S replicate size
(HSDP), EDP = W / EP replicas of each expert, T = micro_batch x seq_len tokens per rank, D hidden,
H/G query/key-value heads, Dh head dim, E experts, K top-k, F expert FFN width, Fs shared FFN width,
V vocabulary, N = T * K * imbalance routed copies computed by one rank's experts.

Where each parameter lives (docs/parallelism.md, SCALE-NOTES):
    dense (attention, norms, routers, shared experts, embedding, head): 1/S of it per rank, or all of it
        when S = 1 (today's DDP layout, replicated on every rank);
    routed experts: E/EP experts per rank, fully sharded over ES = EDP = W/EP expert-data-parallel ranks
        when S > 1 (ER = 1) unless the layout asks for another divisor ES of EDP (strategy.expert_shard_size:
        ER = EDP / ES replicas, all-reduced), replicated over all W/EP when S = 1 (the rule of
        parallel/mesh.py's resolve_expert_shard_size, which this model calls).

Bytes per local parameter (precision):                    32-true  bf16-mixed  bf16-true
    parameters (fp32 master or the weights themselves)     4        4           2
    gradients (kept in the master dtype; FSDP reduces fp32) 4        4           2
    optimizer (AdamW: two moments in the master dtype)      8        8           4
    compute copies (bf16 unsharded per FSDP unit, or the
    autocast copies of every weight when S = 1)             0        2           0

Peak per rank = persistent + the largest of three phases, with
    persistent      = parameters + optimizer + DDP buckets (+ gradients when micro-batches accumulate)
    forward end     = saved activations + logits + compute copies + all-to-all
                      + the previous step's gradients (Lightning zeroes them after training_step)
    backward start  = saved activations + logits working set + backward workspace + compute copies
                      + all-to-all buffers + the LM head's gradient (produced first)
    backward blocks = (S > 1) saved activations + compute copies + FSDP gather buffers (the prefetched unit
                      and one unit's unsharded gradient) + backward workspace + all-to-all
    optimizer step  = gradients + AdamW's temporary sqrt(v) (all parameters with foreach, else one tensor).
With S > 1 the compute copies are the head and the last block (with its experts), whole from the end of the
forward to the start of the backward (parallel/sharding.py does not reshard them); a unit is one block's
dense parameters plus its E/EP experts, unsharded.
Backward trades saved activations for gradients about layer by layer, so its peak is at one end.

Saved activations per block (what autograd keeps between forward and backward, bytes; a activation
dtype, r residual dtype, RMSNorm computes in fp32):
    norms (x2)   T*D*(4 + 4 + a) + T*4           fp32 input and normalised output, the cast output
    attention    T*(H + 2G)*Dh*a                 rotated q, k and v (kept by flash attention)
                 + 2*T*H*Dh*a + T*H*4            its output, the o_proj input, log-sum-exp
    router       T*E*4*3 + T*K*(8+8+8)           fp32 logits, scores, softmax for z-loss; ids, probs
    routed       2*N*D*a + k*N*F*a               expert input and output copies, and k intermediates per copy:
                                                 k = 2 with the fused SwiGLU node (g and u; it recomputes silu(g)
                                                 and h in backward), k = 4 with autograd through the grouped GEMMs
                                                 (gate, up, silu(gate), h) + the gate|up weight copy when fused
    shared       4*T*Fs*a                        gate, up, silu(gate), h of the shared SwiGLU (FeedForward: plain
                                                 autograd; its input is the norm's output, counted there)
    dense FFN    4*T*Fd*a                        the same four at the first_k_dense blocks' width Fd
Which routed-expert path runs is the experts layer's own rule (layers/experts.py runs_fused_swiglu, from
kernels/grouped_mm.py's grouped_mm_choice) for model.moe.grouped_mm_backend on the planned hardware: with
`auto`, the fused node on CPU and torch._grouped_mm on accelerators (assumed to work there: the planner does
not probe hardware it is not running on); `mm` is the fused node everywhere, `torch` and `loop` autograd.
Checkpointing (parallel/recompute.py): full keeps only each block's input (T*D*r) and recomputes one block
at a time in backward (+1 forward: compute x 4/3); selective recomputes the routed experts only
(activation_checkpointing_target=experts: drops k*N*F*a per block, adds their forward FLOPs). Logits: T*V*12 bytes (fp32 log-softmax output, its gradient and the input gradient
live together at the start of backward).

Step time for one micro-batch on every rank (no pipeline; communication from ring collectives):
    compute   = FLOPs/token * T * recompute / (peak * mfu)
    all2all   = 4 * MoE layers * N*D*a * (EP-1)/EP / bw(EP)            (dispatch + combine, fwd + bwd;
                                                                        on the critical path)
    fsdp      = (2*cb + rb) * P_unit * (g-1)/g / bw(span) for the dense (g=S, span S) and expert (g=ES,
                span ES*EP: an expert shard group strides over the expert groups) units
    allreduce = 2 * rb * P_local * (g-1)/g / bw(g) over replicas (R dense, ER experts), once per step
    time      = max(compute, fsdp + allreduce / accumulation) + all2all
FSDP and DDP traffic overlap compute (prefetch, bucketing); the token all-to-all does not. A group
stays on the fast intra-node links when its ranks span at most one node (EP innermost, then shard,
then replicate). Cost per token then follows accelerators/cost.py from the modelled tokens/s.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field

from torch import nn

from moe_plugin.accelerators.catalog import DeviceSpec
from moe_plugin.accelerators.cost import CostEstimate, estimate_cost
from moe_plugin.accelerators.profiles import PROFILES
from moe_plugin.layers.attention import Attention
from moe_plugin.layers.experts import fuse_gate_up, runs_fused_swiglu
from moe_plugin.layers.feed_forward import FeedForward
from moe_plugin.layers.moe import MoE
from moe_plugin.layers.norm_head import NormHead
from moe_plugin.models.inspect import count_parameters, flops_per_token
from moe_plugin.parallel.mesh import LayoutError, resolve_expert_shard_size

GB = 1e9
CHECKPOINTING = ("none", "selective", "full")


@dataclass(frozen=True)
class Precision:
    """Bytes per element of each kind of state under a Lightning `trainer.precision`."""

    name: str
    master: int  # parameters as stored (and sharded)
    grad: int
    moments: int  # both AdamW moments together
    compute: int  # parameter copies used by the matmuls (unsharded under FSDP)
    act: int  # activations
    reduce: int  # gradient reduction dtype


PRECISIONS: dict[str, Precision] = {
    "32-true": Precision("32-true", 4, 4, 8, 4, 4, 4),
    "bf16-mixed": Precision("bf16-mixed", 4, 4, 8, 2, 2, 4),
    "bf16-true": Precision("bf16-true", 2, 2, 4, 2, 2, 2),
}
PRECISION_ALIASES = {"32": "32-true", "bf16": "bf16-mixed"}


def get_precision(name: str) -> Precision:
    key = PRECISION_ALIASES.get(str(name), str(name))
    if key not in PRECISIONS:
        raise ValueError(f"precision={name!r} is not modelled; choose one of {', '.join(PRECISIONS)}.")
    return PRECISIONS[key]


@dataclass(frozen=True)
class ModelShape:
    """What the memory model needs from a model: sizes and parameter counts (from a meta-device build)."""

    name: str
    hidden: int
    vocab: int
    num_heads: int  # per attention layer (all layers equal in the decoder models)
    num_kv_heads: int
    head_dim: int
    num_blocks: int
    num_moe_layers: int
    num_experts: int
    top_k: int
    expert_hidden: int
    shared_hidden: int  # summed width of the shared experts (0: none)
    dense_ffn_hidden: int  # width of the first_k_dense blocks' FFN (0: none)
    dense_params: int  # everything but the routed experts
    expert_params: int  # all routed experts, all layers
    block_dense_params: int  # largest block's non-expert parameters
    block_expert_params: int  # one MoE layer's routed experts (all E)
    root_params: int  # embedding, final norm, head: the root FSDP unit
    head_params: int
    norm_head: bool
    flops_per_token: float  # training FLOPs per token at seq_len (models/inspect.py)
    routed_active_params: int  # top-k routed experts' parameters per token, all layers
    total_params: int
    active_params: int
    seq_len: int
    grouped_mm_backend: str = "auto"  # model.moe.grouped_mm_backend: with the hardware, which expert path runs


def model_shape(model: nn.Module, seq_len: int, name: str = "") -> ModelShape:
    """Read a (meta-device) decoder model's sizes; parameter counts come from models/inspect.py."""
    counts = count_parameters(model)
    attn = [m for m in model.modules() if isinstance(m, Attention)]
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    blocks = list(getattr(model, "layers", []))
    if not attn or not moes or not blocks:
        raise ValueError("the planner models decoder MoE language models (model.layers of attention + MoE blocks).")
    expert_total = counts.components.get("routed_experts", 0)
    moe = moes[0]
    shared = moe.shared_experts.gate_proj.out_features if moe.shared_experts is not None else 0
    dense_ffn = [
        m.gate_proj.out_features for b in blocks if isinstance(getattr(b, "ffn", None), FeedForward) for m in [b.ffn]
    ]

    def block_dense(b: nn.Module) -> int:
        return sum(p.numel() for n, p in b.named_parameters() if ".experts." not in f".{n}")

    embed = getattr(model, "embed_tokens", None)
    head = getattr(model, "lm_head", None)
    head_params = sum(p.numel() for p in head.parameters()) if head is not None else 0
    root = counts.total - sum(p.numel() for b in blocks for p in b.parameters())
    return ModelShape(
        name=name,
        hidden=int(embed.embedding_dim) if embed is not None else int(attn[0].q_proj.in_features),
        vocab=int(embed.num_embeddings) if embed is not None else 0,
        num_heads=attn[0].num_heads,
        num_kv_heads=attn[0].num_kv_heads,
        head_dim=attn[0].head_dim,
        num_blocks=len(blocks),
        num_moe_layers=len(moes),
        num_experts=moe.num_experts,
        top_k=moe.top_k,
        expert_hidden=moe.experts.ffn_hidden_size,
        shared_hidden=shared,
        dense_ffn_hidden=max(dense_ffn, default=0),
        dense_params=counts.total - expert_total,
        expert_params=expert_total,
        block_dense_params=max(block_dense(b) for b in blocks),
        block_expert_params=sum(p.numel() for p in moe.experts.parameters()),
        root_params=root,
        head_params=head_params,
        norm_head=isinstance(head, NormHead),
        flops_per_token=float(flops_per_token(model, seq_len)),
        routed_active_params=expert_total * moe.top_k // moe.num_experts,
        total_params=counts.total,
        active_params=counts.active,
        seq_len=seq_len,
        grouped_mm_backend=moe.experts.grouped_mm_backend,
    )


@dataclass(frozen=True)
class Interconnect:
    """Per-device collective bandwidth (GB/s, one direction) inside a node and across nodes."""

    devices_per_node: int = 8
    intra_gbs: float = 200.0  # NVLink-class (H800: 400 GB/s bidirectional)
    inter_gbs: float = 50.0  # one 400 Gb/s NIC per device

    def bandwidth(self, span: int) -> float:
        """Bytes/s of a group whose ranks lie within `span` consecutive ranks."""
        return (self.intra_gbs if span <= self.devices_per_node else self.inter_gbs) * GB


@dataclass(frozen=True)
class Layout:
    world: int
    ep: int
    shard: int
    checkpointing: str = "none"
    micro_batch: int = 1
    expert_shard_size: int | None = None  # strategy.expert_shard_size; None = the mesh's default rule

    @property
    def replicate(self) -> int:
        return self.world // self.shard

    @property
    def edp(self) -> int:
        """Replicas of each expert: W / EP."""
        return self.world // self.ep

    @property
    def expert_shard(self) -> int:
        """ES: ranks each local expert block is split over (parallel/mesh.py's rule, not a copy of it)."""
        return resolve_expert_shard_size(self.world, self.ep, self.shard, self.expert_shard_size)

    @property
    def sharded(self) -> bool:
        return self.shard > 1

    def label(self) -> str:
        es = "" if self.expert_shard_size is None else f" ES{self.expert_shard_size}"
        return (
            f"EP{self.ep} x shard{self.shard} x rep{self.replicate}{es} ckpt={self.checkpointing} mb={self.micro_batch}"
        )


def layout_error(shape: ModelShape, layout: Layout) -> str | None:
    """Why a layout cannot be built at all (divisibility), or None."""
    w, ep, s = layout.world, layout.ep, layout.shard
    if w % ep or shape.num_experts % ep:
        return f"expert_parallel_size={ep} must divide the devices ({w}) and the experts ({shape.num_experts})"
    if w % s:
        return f"data_parallel_shard_size={s} must divide the devices ({w})"
    if layout.checkpointing not in CHECKPOINTING:
        return f"activation_checkpointing={layout.checkpointing!r} is not one of {CHECKPOINTING}"
    if layout.micro_batch < 1:
        return f"micro_batch={layout.micro_batch} must be >= 1"
    try:
        layout.expert_shard  # noqa: B018 (the mesh's rule raises for an ES the layout cannot have)
    except LayoutError:
        valid = "1" if s == 1 else f"a divisor of {w // ep}"
        return f"expert_shard={layout.expert_shard_size} must be {valid} (the experts' data-parallel replicas)"
    return None


@dataclass
class MemoryEstimate:
    """Bytes per rank by term, and the peak of the three phases of a training step."""

    terms: dict[str, float]
    persistent: float
    phases: dict[str, float]  # forward end, backward start, optimizer step: bytes on top of `persistent`

    @property
    def peak(self) -> float:
        return self.persistent + max(self.phases.values())

    @property
    def phase(self) -> str:
        return max(self.phases, key=lambda k: self.phases[k])


# N x F (or T x F) intermediates autograd keeps per SwiGLU MLP (measured with saved-tensor hooks in
# tests/unit/parallel/test_plan.py): the fused SwiGLU experts node keeps g and u; autograd through the matmuls
# and SwiGLU ops (the grouped-GEMM experts path, FeedForward) keeps gate, up, silu(gate) and h.
FUSED_SWIGLU_SAVED = 2
COMPOSED_SWIGLU_SAVED = 4


def planned_device_type(spec: DeviceSpec) -> str:
    """The torch device type the planned hardware trains on: "cpu" for the host CPU entry, the vendor
    profile's device type otherwise ("accelerator" for anonymised catalog entries with no vendor or one
    without a profile: only "cpu" versus anything else changes the model)."""
    profile = PROFILES.get(spec.vendor or "")
    return profile.device_type if profile is not None else "accelerator"


def routed_expert_intermediates(shape: ModelShape, device_type: str) -> int:
    """k: N x F tensors the routed experts keep per copy between forward and backward, for the path the experts
    layer takes with model.moe.grouped_mm_backend on `device_type` (see the module docstring)."""
    fused = runs_fused_swiglu(shape.grouped_mm_backend, device_type)
    return FUSED_SWIGLU_SAVED if fused else COMPOSED_SWIGLU_SAVED


def _block_activations(
    shape: ModelShape, T: int, n: float, p: Precision, r: int, moe: bool, k: int
) -> dict[str, float]:
    """Bytes autograd saves for one block (see the module docstring); `n` routed copies on this rank, `k`
    intermediates per routed copy (routed_expert_intermediates)."""
    D, a = shape.hidden, p.act
    H, G, Dh = shape.num_heads, shape.num_kv_heads, shape.head_dim
    norm = T * D * (4 + 4 + a) + T * 4 - (T * D * 4 if r == 4 else 0)  # the fp32 input is the residual itself
    out = {
        "residual": T * D * r,
        "norms": 2 * norm,
        "attention": T * (H + 2 * G) * Dh * a + 2 * T * H * Dh * a + T * H * 4,
    }
    if moe:
        E, K, F = shape.num_experts, shape.top_k, shape.expert_hidden
        out["router"] = T * E * 4 * 3 + T * K * 24 + (T * D * 4 if a != 4 else 0)
        out["routed_experts"] = 2 * n * D * a + k * n * F * a
        out["shared_experts"] = COMPOSED_SWIGLU_SAVED * T * shape.shared_hidden * a
    else:
        out["dense_ffn"] = COMPOSED_SWIGLU_SAVED * T * shape.dense_ffn_hidden * a
    return out


def memory(
    shape: ModelShape,
    layout: Layout,
    precision: Precision,
    accumulation: int = 1,
    imbalance: float = 1.0,
    foreach: bool | None = None,
    device_type: str = "accelerator",
) -> MemoryEstimate:
    """Per-rank bytes of one layout (see the module docstring for every formula).

    `device_type`: the torch device type of the planned hardware (planned_device_type); with
    model.moe.grouped_mm_backend it decides the routed experts' path, hence their saved activations and
    backward workspace. Any name but "cpu" is an accelerator.
    `foreach`: the optimizer updates all parameters at once (torch's AdamW default on accelerators), so
    its temporary is the size of all local parameters; False (the CPU default) loops over tensors and
    needs one temporary the size of the largest. None: torch's default for `device_type`."""
    if foreach is None:
        foreach = device_type != "cpu"
    p, L = precision, layout
    T = L.micro_batch * shape.seq_len
    D, V = shape.hidden, shape.vocab
    n = T * shape.top_k * imbalance
    autocast = p.name == "bf16-mixed" and not L.sharded  # today's layout: fp32 weights, autocast copies
    r = 4 if (p.act == 4 or autocast) else p.act

    dense_local = shape.dense_params / L.shard
    experts_local = shape.expert_params / L.ep / L.expert_shard
    local = dense_local + experts_local
    t: dict[str, float] = {
        "parameters": local * p.master,
        "gradients": local * p.grad,
        "optimizer": local * p.moments,
        # DDP's flat gradient buckets (one process: no DDP)
        "ddp_buckets": 0.0 if (L.sharded or L.world == 1) else shape.dense_params * p.reduce,
    }
    if L.sharded:
        unit = shape.block_dense_params + shape.block_expert_params / L.ep
        extra_reduce = p.reduce if p.reduce != p.compute else 0
        # whole at the end of the forward and the start of the backward (sharding.py): the head (its own unit,
        # not resharded after forward; the embedding is) and the last block with its experts (not resharded
        # either); while backward goes through the blocks: one more unit (the prefetched one) and one unit's
        # unsharded gradient (plus its copy in the reduce dtype when that differs). The head's gradient is
        # `head_gradient`. Untied embedding and head assumed (tied ones stay in the root, whole all step).
        t["compute_copies"] = (shape.head_params + unit) * p.compute
        t["gather_buffers"] = unit * (2 * p.compute + extra_reduce)
    else:
        t["compute_copies"] = (local - (V * D if V else 0)) * 2 if autocast else 0.0
        t["gather_buffers"] = 0.0

    blocks: dict[str, float] = {}
    per_block_all: list[dict[str, float]] = []
    k_routed = routed_expert_intermediates(shape, device_type)
    fused_node = k_routed == FUSED_SWIGLU_SAVED
    for i in range(shape.num_blocks):
        is_moe = i >= shape.num_blocks - shape.num_moe_layers
        per_block_all.append(_block_activations(shape, T, n, p, r, is_moe, k_routed))
    e_local = shape.num_experts // L.ep
    # the autograd path's gate|up weight concatenation (layers/experts.py fuse_gate_up); the fused node has none
    fuse = not fused_node and fuse_gate_up(e_local, D, int(n))
    fused_copy = e_local * D * 2 * shape.expert_hidden * p.compute if fuse else 0.0
    recomputed = 0.0
    for acts in per_block_all:
        if L.checkpointing == "full":
            blocks["checkpoint_inputs"] = blocks.get("checkpoint_inputs", 0.0) + acts["residual"]
            recomputed = max(recomputed, sum(acts.values()) + (fused_copy if "router" in acts else 0))
            continue
        for k, v in acts.items():
            if L.checkpointing == "selective" and k == "routed_experts":
                v = 2 * n * D * p.act  # the experts' input is kept, their intermediates recomputed
                recomputed = max(recomputed, k_routed * n * shape.expert_hidden * p.act + fused_copy)
            blocks[k] = blocks.get(k, 0.0) + v
        if "router" in acts and L.checkpointing == "none":
            blocks["routed_experts"] += fused_copy
    head = T * D * (8 + p.act) + T * 4 + (shape.head_params * p.compute if shape.norm_head else 0)
    t["activations"] = sum(blocks.values()) + head + recomputed
    # forward end: the logits (kept by training_step), the fp32 copy (bf16) and the log-softmax output;
    # backward start: the log-softmax output, its gradient and the input gradient
    t["logits"] = T * V * 12.0
    logits_fwd = T * V * (8.0 + (p.act if p.act != 4 else 0))
    F_ = shape.expert_hidden
    # the routed experts' backward: dx and dy (N x D) with, through autograd, the gradients of h, silu(gate)
    # and up for all copies at once (3 N x F), or in the fused node dh, du, silu(g) and silu(g)*u for one
    # expert's copies at a time (4 N/E_local x F)
    expert_ws = 4 * n / max(e_local, 1) * F_ if fused_node else 3 * n * F_
    t["backward_workspace"] = (2 * n * D + expert_ws) * p.act + 2 * T * D * r
    t["all_to_all"] = 2 * n * D * p.act if L.ep > 1 else 0.0
    t["head_gradient"] = shape.head_params * (p.compute if L.sharded else p.grad)
    # AdamW's sqrt of the second moment: for all local parameters at once (foreach) or the largest tensor
    largest_tensor = max(V * D / L.shard, shape.block_expert_params / 3 / (L.ep * L.expert_shard))
    t["optimizer_step_temp"] = (local if foreach else largest_tensor) * p.master

    accumulating = accumulation > 1
    persistent = t["parameters"] + t["optimizer"] + t["ddp_buckets"] + (t["gradients"] if accumulating else 0)
    grads = 0.0 if accumulating else t["gradients"]
    common = t["activations"] + t["compute_copies"] + t["all_to_all"]
    phases = {
        # Lightning's closure zeroes gradients after training_step, before backward: the previous step's
        # gradients are still allocated at the end of the forward
        "forward end": common - recomputed + logits_fwd + grads,  # nothing is being recomputed yet
        "backward start": common + t["logits"] + t["backward_workspace"] + t["head_gradient"],
        "optimizer step": grads + t["optimizer_step_temp"],
    }
    if L.sharded:  # the logits' working set is gone once the head's backward is done; FSDP's buffers come
        phases["backward blocks"] = common + t["gather_buffers"] + t["backward_workspace"]
    else:
        phases["backward start"] += t["gather_buffers"]
    t.update({f"activations.{k}": v for k, v in blocks.items()})
    return MemoryEstimate(t, persistent, phases)


@dataclass
class TimeEstimate:
    compute_s: float
    all_to_all_s: float
    fsdp_s: float
    allreduce_s: float  # per optimizer step
    step_s: float  # one micro-batch on every rank, optimizer-step traffic amortised
    tokens_per_s_per_device: float


def step_time(
    shape: ModelShape,
    layout: Layout,
    precision: Precision,
    spec: DeviceSpec,
    mfu: float,
    net: Interconnect,
    accumulation: int = 1,
    imbalance: float = 1.0,
) -> TimeEstimate:
    """Seconds per micro-batch (see the module docstring)."""
    p, L = precision, layout
    T = L.micro_batch * shape.seq_len
    recompute = 0.0
    if L.checkpointing == "full":
        recompute = shape.flops_per_token / 3.0  # the forward once more
    elif L.checkpointing == "selective":
        recompute = 2.0 * shape.routed_active_params  # the routed experts' forward once more
    compute = (shape.flops_per_token + recompute) * T / (spec.peak_flops * mfu)

    n = T * shape.top_k * imbalance
    a2a_bytes = 4 * shape.num_moe_layers * n * shape.hidden * p.act * (L.ep - 1) / L.ep
    a2a_bytes *= 1.5 if L.checkpointing == "full" else 1.0  # recomputation dispatches and combines again
    a2a = a2a_bytes / net.bandwidth(L.ep) if L.ep > 1 else 0.0

    fsdp = allreduce = 0.0
    if L.sharded:
        per_pass = 2 * p.compute + p.reduce  # all-gather forward and backward, reduce-scatter
        g = L.shard
        fsdp += per_pass * shape.dense_params * (g - 1) / g / net.bandwidth(g)
        ge = L.expert_shard
        if ge > 1:
            span = ge * L.ep  # rank = es * EP + ep: the group strides over the expert groups
            fsdp += per_pass * (shape.expert_params / L.ep) * (ge - 1) / ge / net.bandwidth(span)
        er = L.edp // ge
        if L.replicate > 1:
            local = shape.dense_params / L.shard
            allreduce = 2 * p.reduce * local * (L.replicate - 1) / L.replicate / net.bandwidth(L.world)
        if er > 1:
            local = shape.expert_params / L.ep / ge
            allreduce += 2 * p.reduce * local * (er - 1) / er / net.bandwidth(L.world)
    else:
        w, edp = L.world, L.edp
        if w > 1:
            allreduce += 2 * p.reduce * shape.dense_params * (w - 1) / w / net.bandwidth(w)
        if edp > 1:
            allreduce += 2 * p.reduce * shape.expert_params / L.ep * (edp - 1) / edp / net.bandwidth(w)
    step = max(compute, fsdp + allreduce / accumulation) + a2a
    return TimeEstimate(compute, a2a, fsdp, allreduce, step, T / step)


@dataclass
class PlanEntry:
    layout: Layout
    memory: MemoryEstimate | None
    time: TimeEstimate | None
    fits: bool
    reason: str  # why it does not fit (empty when it does)
    cost: CostEstimate | None = None

    def as_dict(self) -> dict:
        out: dict = {**asdict(self.layout), "replicate": self.layout.replicate, "fits": self.fits}
        if self.memory is not None:  # buildable: the effective ES (asdict gives the requested one, None = default)
            out["expert_shard"] = self.layout.expert_shard
        out["reason"] = self.reason
        if self.memory is not None:
            out["memory_gb"] = {k: v / GB for k, v in self.memory.terms.items()}
            out["peak_gb"] = self.memory.peak / GB
            out["peak_phase"] = self.memory.phase
        if self.time is not None:
            out["time"] = asdict(self.time)
        if self.cost is not None:
            out["cost"] = self.cost.as_dict()
        return out


# Terms a user can act on, in the order a reason names them.
_STATE_TERMS = ("parameters", "gradients", "optimizer", "ddp_buckets", "compute_copies", "gather_buffers")
_ACT_TERMS = ("activations", "logits", "backward_workspace", "all_to_all", "head_gradient", "optimizer_step_temp")


def why_not(mem: MemoryEstimate, usable: float) -> str:
    """'needs X GB > Y GB usable: largest terms ...' naming the terms that exceed the budget."""
    top = sorted(((k, mem.terms[k]) for k in _STATE_TERMS + _ACT_TERMS if mem.terms[k] > 0), key=lambda kv: -kv[1])
    state = sum(mem.terms[k] for k in ("parameters", "gradients", "optimizer", "ddp_buckets"))
    detail = ", ".join(f"{k} {v / GB:.1f}" for k, v in top[:3])
    prefix = f"needs {mem.peak / GB:.1f} GB > {usable / GB:.1f} GB usable"
    if state > usable:
        return f"{prefix}: weights+gradients+optimizer alone are {state / GB:.1f} GB ({detail})"
    return f"{prefix} ({detail})"


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass
class PlanResult:
    shape: ModelShape
    spec: DeviceSpec
    precision: Precision
    usable_bytes: float
    entries: list[PlanEntry] = field(default_factory=list)

    @property
    def fitting(self) -> list[PlanEntry]:
        return sorted((e for e in self.entries if e.fits), key=lambda e: e.time.step_s / e.layout.micro_batch)  # type: ignore[union-attr]

    @property
    def not_fitting(self) -> list[PlanEntry]:
        return [e for e in self.entries if not e.fits]

    def recommended(self, tolerance: float = 0.02) -> PlanEntry | None:
        """The layout with the most memory headroom among those within `tolerance` of the fastest per
        token: estimates this coarse cannot tell a 1% speed-up apart, but headroom absorbs routing skew."""
        fitting = self.fitting
        if not fitting:
            return None
        best = fitting[0].time.tokens_per_s_per_device  # type: ignore[union-attr]
        close = [e for e in fitting if e.time.tokens_per_s_per_device >= best * (1 - tolerance)]  # type: ignore[union-attr]
        return min(close, key=lambda e: (e.memory.peak, e.layout.replicate))  # type: ignore[union-attr]


def plan(
    shape: ModelShape,
    spec: DeviceSpec,
    devices: int,
    precision: Precision,
    mfu: float,
    net: Interconnect = Interconnect(),
    micro_batches: tuple[int, ...] = (1, 2, 4, 8),
    checkpointing: tuple[str, ...] = CHECKPOINTING,
    eps: tuple[int, ...] | None = None,
    shards: tuple[int, ...] | None = None,
    expert_shards: tuple[int | None, ...] = (None,),
    usable_fraction: float = 0.9,
    global_batch: int | None = None,
    imbalance: float = 1.0,
    tokens: float = 1e12,
    foreach: bool | None = None,
) -> PlanResult:
    """Every layout of `devices` ranks, with its memory, step time and cost; see PlanResult.fitting.

    The hardware's device type (planned_device_type) picks the routed experts' path and, unless `foreach` is
    given, whether AdamW updates all tensors at once (accelerators) or one at a time (CPU).

    `expert_shards`: the ES values to consider (None = the mesh's default rule); values a (EP, shard) pair
    cannot have (not a divisor of W / EP, or > 1 with shard 1) are skipped unless none is valid."""
    if devices < 1:
        raise ValueError(f"devices={devices} must be >= 1.")
    if spec.memory_gb is None:
        raise ValueError(f"hardware={spec.name} has no memory_gb in the catalog: set hardware.memory_gb=<GB>.")
    if not 0 < usable_fraction <= 1:
        raise ValueError(f"usable={usable_fraction} must be a fraction in (0, 1] of the device memory.")
    if imbalance < 1:
        raise ValueError(f"imbalance={imbalance} must be >= 1 (busiest rank's routed copies / the mean).")
    usable = spec.memory_gb * GB * usable_fraction
    result = PlanResult(shape, spec, precision, usable)
    ep_choices = eps or tuple(d for d in divisors(devices) if shape.num_experts % d == 0)
    for ep, s, ck, mb in itertools.product(ep_choices, shards or divisors(devices), checkpointing, micro_batches):
        candidates = [Layout(devices, ep, s, ck, mb, es) for es in dict.fromkeys(expert_shards)]
        valid = [c for c in candidates if layout_error(shape, c) is None]
        for layout in _distinct_expert_shards(valid) or candidates[:1]:
            _plan_one(result, shape, spec, layout, precision, mfu, net, global_batch, imbalance, tokens, foreach)
    return result


def _distinct_expert_shards(layouts: list[Layout]) -> list[Layout]:
    """One layout per effective ES (None and an explicit value equal to the default are the same layout)."""
    seen: set[int] = set()
    out = []
    for layout in layouts:
        if layout.expert_shard not in seen:
            seen.add(layout.expert_shard)
            out.append(layout)
    return out


def _plan_one(
    result: PlanResult,
    shape: ModelShape,
    spec: DeviceSpec,
    layout: Layout,
    precision: Precision,
    mfu: float,
    net: Interconnect,
    global_batch: int | None,
    imbalance: float,
    tokens: float,
    foreach: bool | None,
) -> None:
    """Append `layout`'s entry (its error, or its memory, time, cost and whether it fits) to `result`."""
    devices, mb, usable = layout.world, layout.micro_batch, result.usable_bytes
    err = layout_error(shape, layout)
    if err:
        result.entries.append(PlanEntry(layout, None, None, False, err))
        return
    per_step = devices * mb
    accumulation = max(1, math.ceil(global_batch / per_step)) if global_batch else 1
    mem = memory(shape, layout, precision, accumulation, imbalance, foreach, planned_device_type(spec))
    t = step_time(shape, layout, precision, spec, mfu, net, accumulation, imbalance)
    fits = mem.peak <= usable
    cost = None
    if fits and spec.price_per_hour > 0:
        cost = estimate_cost(spec, shape.flops_per_token, tokens, tokens_per_s_per_device=t.tokens_per_s_per_device)
    result.entries.append(PlanEntry(layout, mem, t, fits, "" if fits else why_not(mem, usable), cost))
