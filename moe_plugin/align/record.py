"""`align record`: N training steps with a fixed seed and fixed batches, fingerprinted per module.

Shapes: B batch, S sequence, V vocabulary.

What makes two records comparable (checked by compare.py through hashes stored in the record):
    - the same batches: a Markov chain over V tokens (transition table and sequences drawn from a
      CPU torch.Generator seeded with `seed`), or batches loaded from a file saved by another run;
    - the same initial weights: the model is built in float32 on the CPU under `torch.manual_seed(seed)`
      and only then moved to the device and cast;
    - the same optimiser: AdamW (0.9, 0.95, eps 1e-8, weight decay 0.1, the paper's), clip 1.0.
What may differ (that is what alignment measures): device/vendor, precision, threads, expert
compute path, parallel layout.

Per step the record holds: loss, forward fingerprints per probe point, backward fingerprints of the
gradient w.r.t. each point's output, and every parameter gradient's fingerprint (before the update).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from moe_plugin.align.fingerprint import fingerprint
from moe_plugin.align.probes import ModuleProbes, grad_fingerprints
from moe_plugin.layers.moe import collect_aux_losses
from moe_plugin.models.decoder import MoEDecoderLM

FORMAT_VERSION = 1
PRECISIONS = ("32-true", "bf16-mixed", "bf16-true", "16-mixed", "64-true")

# A small Ling-shaped model: shared expert, softmax top-k renormalised, NormHead. Fast on a CPU.
DEFAULT_MODEL: dict[str, Any] = {
    "vocab_size": 256,
    "hidden_size": 64,
    "num_layers": 2,
    "num_heads": 4,
    "num_kv_heads": 2,
    "max_seq_len": 64,
    "norm_head": True,
    "moe": {"num_experts": 8, "top_k": 2, "expert_hidden_size": 64, "num_shared_experts": 1},
}


@dataclass
class RecordConfig:
    steps: int = 8
    seed: int = 1234
    batch_size: int = 4
    seq_len: int = 32
    lr: float = 3e-3
    precision: str = "32-true"
    threads: int | None = None
    accelerator: str = "cpu"
    expert_path: str | None = None  # model.moe.grouped_mm_backend: "auto" (fused where it works) | "torch" | "loop"
    model: dict[str, Any] = field(default_factory=lambda: json.loads(json.dumps(DEFAULT_MODEL)))
    batches_file: str | None = None  # replay batches saved by another record (--batches)
    label: str = ""


def markov_batches(steps: int, batch_size: int, seq_len: int, vocab: int, seed: int) -> torch.Tensor:
    """[steps, B, S+1] token ids from a sparse random Markov chain: learnable, so the loss falls.

    Batch s depends only on (seed, s), so a shorter record's batches are a prefix of a longer one's.
    """
    g = torch.Generator().manual_seed(seed)
    # Each token has 4 likely successors: the loss can fall from ln(V) towards ln(4).
    successors = torch.randint(0, vocab, (vocab, 4), generator=g)
    out = torch.empty(steps, batch_size, seq_len + 1, dtype=torch.int64)
    for step in range(steps):
        gs = torch.Generator().manual_seed(seed * 1_000_003 + step + 1)
        out[step, :, 0] = torch.randint(0, vocab, (batch_size,), generator=gs)
        choice = torch.randint(0, 4, (batch_size, seq_len), generator=gs)
        for s in range(seq_len):
            out[step, :, s + 1] = successors[out[step, :, s], choice[:, s]]
    return out


def tensor_hash(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def params_hash(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _autocast(precision: str, device_type: str) -> contextlib.AbstractContextManager[Any]:
    if precision == "bf16-mixed":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    if precision == "16-mixed":
        return torch.autocast(device_type, dtype=torch.float16)
    return contextlib.nullcontext()


def compute_dtype(precision: str) -> str:
    """The lowest precision the run computes in: picks compare.py's default tolerances."""
    return {"32-true": "fp32", "64-true": "fp64", "bf16-mixed": "bf16", "bf16-true": "bf16", "16-mixed": "fp16"}[
        precision
    ]


def _apply_expert_path(model_cfg: dict[str, Any], path: str | None) -> str:
    """Select the expert compute path (`model.moe.grouped_mm_backend`); returns the requested name.

    The kernels package (moe_plugin.kernels) picks the implementation: "auto" takes the fused
    grouped GEMM where it works on this device and dtype, "loop" is the reference fallback. What
    actually ran is observed during the first forward (`ExpertPathObserver`), inside the precision
    context, because the choice may depend on it.
    """
    import inspect as pyinspect

    from moe_plugin.layers.moe import MoE

    selectable = "grouped_mm_backend" in pyinspect.signature(MoE.__init__).parameters
    if path is not None:
        if not selectable:
            raise ValueError(f"--expert-path={path!r}: this build of moe_plugin has no selectable expert compute path.")
        model_cfg.setdefault("moe", {})["grouped_mm_backend"] = path
    if not selectable:
        return "loop"
    return str(model_cfg.get("moe", {}).get("grouped_mm_backend", "auto"))


class ExpertPathObserver:
    """Names the grouped-matmul implementation each experts module actually uses (first forward)."""

    def __init__(self, model: torch.nn.Module) -> None:
        import moe_plugin.kernels as kernels

        self.names: set[str] = set()
        self._name_of = getattr(kernels, "grouped_mm_backend_name", None)
        self._handles = [
            m.register_forward_pre_hook(self._hook)
            for m in model.modules()
            if callable(getattr(m, "grouped_mm", None)) and callable(self._name_of)
        ]

    def _hook(self, module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        self.names.add(str(self._name_of(module.grouped_mm(args[0]))))  # type: ignore[misc, operator]

    def remove(self) -> str:
        for h in self._handles:
            h.remove()
        return "+".join(sorted(self.names)) or "loop"


def _resolve_device(accelerator: str) -> torch.device:
    from moe_plugin.accelerators.resolve import select_vendor

    profile = select_vendor(accelerator)
    return torch.device(profile.device_type, 0) if profile.device_type != "cpu" else torch.device("cpu")


def record(cfg: RecordConfig) -> dict[str, Any]:
    """Run the steps and return the record (a JSON-serialisable dict)."""
    if cfg.precision not in PRECISIONS:
        raise ValueError(f"--precision={cfg.precision!r}: choose one of {', '.join(PRECISIONS)}.")
    if cfg.steps < 1:
        raise ValueError(f"--steps={cfg.steps} must be >= 1.")
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    device = _resolve_device(cfg.accelerator)
    requested_path = _apply_expert_path(cfg.model, cfg.expert_path)

    vocab = int(cfg.model.get("vocab_size", DEFAULT_MODEL["vocab_size"]))
    if cfg.batches_file:
        batches = torch.load(cfg.batches_file, weights_only=True)
        if batches.dim() != 3 or batches.shape[0] < cfg.steps:
            raise ValueError(
                f"--batches {cfg.batches_file}: need [steps>={cfg.steps}, B, S+1], got {list(batches.shape)}."
            )
        batches = batches[: cfg.steps]
    else:
        batches = markov_batches(cfg.steps, cfg.batch_size, cfg.seq_len, vocab, cfg.seed)
    if int(batches.max()) >= vocab:
        raise ValueError(f"batches hold token ids up to {int(batches.max())} but model.vocab_size={vocab}.")

    torch.manual_seed(cfg.seed)
    model = MoEDecoderLM(**cfg.model)  # fp32 on the CPU: identical initial weights everywhere
    init_hash = params_hash(model)
    model = model.to(device)
    if cfg.precision == "bf16-true":
        model = model.to(torch.bfloat16)
    elif cfg.precision == "64-true":
        model = model.to(torch.float64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    scaler = torch.amp.GradScaler(device.type) if cfg.precision == "16-mixed" else None

    probes = ModuleProbes(model)
    observer = ExpertPathObserver(model)
    steps = []
    try:
        for step in range(cfg.steps):
            batch_BS1 = batches[step].to(device)
            inputs_BS, targets_BS = batch_BS1[:, :-1], batch_BS1[:, 1:]
            probes.start_step()
            optimizer.zero_grad(set_to_none=True)
            with _autocast(cfg.precision, device.type):
                logits_BSV = model(inputs_BS)
                ce = F.cross_entropy(logits_BSV.float().reshape(-1, logits_BSV.shape[-1]), targets_BS.reshape(-1))
                aux = collect_aux_losses(model)
                loss = ce + aux if aux is not None else ce
            (scaler.scale(loss) if scaler else loss).backward()
            if scaler:
                scaler.unscale_(optimizer)
            grads = grad_fingerprints(model)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            steps.append(
                {
                    "step": step,
                    "loss": loss.item(),
                    "ce": ce.item(),
                    "grad_norm": float(grad_norm),
                    "forward": {k: v.as_dict() for k, v in probes.forward.items()},
                    "backward": {k: v.as_dict() for k, v in probes.backward.items()},
                    "routing": dict(probes.routing),
                    "grads": {k: v.as_dict() for k, v in grads.items()},
                }
            )
    finally:
        probes.remove()
        expert_path = f"{requested_path}->{observer.remove()}"

    return {
        "format": FORMAT_VERSION,
        "label": cfg.label or f"{device.type}/{cfg.precision}/threads={torch.get_num_threads()}/{expert_path}",
        "config": asdict(cfg),
        "env": {
            "device": str(device),
            "device_name": _device_name(device),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "expert_path": expert_path,
            "compute_dtype": compute_dtype(cfg.precision),
        },
        "batches_hash": tensor_hash(batches),
        "batch_hashes": [tensor_hash(b) for b in batches],
        "init_hash": init_hash,
        "kinds": dict(probes.kinds),
        "final_params": fingerprint(
            torch.cat([p.detach().float().reshape(-1).cpu() for p in model.parameters()])
        ).as_dict(),
        "steps": steps,
    }


def _device_name(device: torch.device) -> str:
    if device.type == "cpu":
        from moe_plugin.accelerators.detect import detected

        return detected().inputs.cpu_name
    mod = getattr(torch, device.type, None)
    return (
        str(mod.get_device_name(device.index or 0))
        if mod is not None and hasattr(mod, "get_device_name")
        else device.type
    )


def save_record(rec: dict[str, Any], path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(rec))


def load_record(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"align record {p} does not exist; create it with `moe-plugin align record --out {p}`.")
    try:
        rec = json.loads(p.read_text())
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError; neither names the file
        raise ValueError(
            f"align record {p} is not a JSON record ({type(err).__name__}: {err}); it is truncated or not written by "
            f"`moe-plugin align record`. Re-record it: moe-plugin align record --out {p}."
        ) from None
    if not isinstance(rec, dict) or rec.get("format") != FORMAT_VERSION:
        rec = rec if isinstance(rec, dict) else {}
        raise ValueError(
            f"{p}: record format {rec.get('format')} is not {FORMAT_VERSION}; re-record it with this version."
        )
    return rec
