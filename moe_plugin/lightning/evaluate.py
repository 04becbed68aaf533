"""Evaluation and samples for `run()`: `python train.py train=false test=true ckpt_path=...` and `test=true`
after training (the lightning-hydra-template convention), and the few sampled lines of the run summary.

Metrics of the test split (data.test_fraction of the documents, held out from train and validation; the
validation split when there is none), all from the mean token cross-entropy L (nats):

    perplexity     = exp(L)
    bits per byte  = L * tokens / (bytes * ln 2)       (= L / ln 2 for the byte tokenizer)
    tokens/s       = test tokens / wall time of trainer.test

written to <run folder>/test_metrics.json and to every logger (test/loss, test/perplexity, ...).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig, OmegaConf

from moe_plugin.config.validate import ConfigError
from moe_plugin.lightning.module import MoELanguageModule


def module_for_evaluation(cfg: DictConfig, module: MoELanguageModule) -> MoELanguageModule:
    """train=false with ckpt_path: the checkpoint's own model (its saved config; any file or EP directory we write)."""
    if cfg.get("train", True):
        return module
    if not cfg.get("ckpt_path"):
        if cfg.get("test"):
            raise ConfigError(
                "train=false test=true evaluates a checkpoint: set ckpt_path=PATH (a .ckpt file, an expert-parallel "
                "checkpoint directory, or the output of `moe-plugin convert from-hf`)."
            )
        return module
    from moe_plugin.convert.hf.source import load_model

    model = load_model(cfg.ckpt_path)
    optim = OmegaConf.to_container(cfg.optim, resolve=True) if cfg.get("optim") else {}
    assert isinstance(optim, dict)
    return MoELanguageModule(model, **optim)


def run_test(
    trainer: pl.Trainer, module: MoELanguageModule, datamodule: Any, output_dir: Path, steps: int
) -> dict[str, Any]:
    """trainer.test on the test split; returns and writes the metrics above."""
    t0 = time.perf_counter()
    results = trainer.test(module, datamodule=datamodule, verbose=False)[0]
    seconds = time.perf_counter() - t0
    loss = float(results["test/loss"])
    stats = getattr(datamodule, "stats", {}) or {}
    held_out = getattr(datamodule, "test_set", None) is not None
    split = datamodule.test_set if held_out else datamodule.val_set
    # predictions made: the windows the test loop ran (all, unless trainer.limit_test_batches), every position
    batches = int(sum(trainer.num_test_batches))
    windows = min(len(split), batches * datamodule.batch_size * trainer.world_size)
    tokens = windows * split.seq_len
    prefix = "test" if held_out else "val"
    if stats.get(f"{prefix}_bytes"):  # UTF-8 bytes per token of the split evaluated
        bytes_per_token = stats[f"{prefix}_bytes"] / max(1, stats[f"{prefix}_tokens"])
    else:  # a data module without byte counts: exact for the byte tokenizer only
        bytes_per_token = 1.0 if getattr(datamodule, "vocab_size", 256) == 256 else float("nan")
    metrics = {
        "test/loss": loss,
        "test/perplexity": math.exp(min(loss, 80.0)),
        "test/bits_per_byte": loss / (math.log(2) * bytes_per_token),
        "test/tokens_per_second": tokens / seconds if seconds > 0 else 0.0,
        "test/tokens": tokens,
        "test/split": "test" if held_out else "validation",
        "test/step": steps,
    }
    numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "test/loss"}
    for lg in trainer.loggers:
        lg.log_metrics(numeric, step=steps)
        lg.save()  # trainer.test already flushed its loggers; CSVLogger buffers until save()
    if trainer.is_global_zero:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "test_metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def format_test(m: dict[str, Any]) -> str:
    return (
        f"  test ({m['test/split']} split)  loss {m['test/loss']:.4f}  perplexity {m['test/perplexity']:.2f}  "
        f"bits/byte {m['test/bits_per_byte']:.3f}  {m['test/tokens_per_second']:,.0f} tokens/s\n"
    )


def sample_lines(
    model: torch.nn.Module, datamodule: Any, num: int, prompt_tokens: int = 24, new_tokens: int = 48
) -> list[str]:
    """`num` continuations of validation-text prompts (sampled at temperature 0.8, top-k 20, fixed seed): a
    newcomer sees what the model learned. Empty when the model cannot generate (no KV cache) or num == 0."""
    from moe_plugin.models.generation import generate

    val = getattr(datamodule, "val_set", None)
    tok = getattr(datamodule, "tokenizer", None)
    if num <= 0 or val is None or tok is None or not hasattr(model, "new_cache") or len(val) == 0:
        return []
    device = next(model.parameters()).device
    lines = []
    generator = torch.Generator(device=device).manual_seed(0)
    for i in range(min(num, len(val))):
        prompt = val[i * len(val) // num][:prompt_tokens].to(device)
        out = generate(model, prompt[None], new_tokens, temperature=0.8, top_k=20, generator=generator)[0]
        text = tok.decode(prompt.tolist()) + " |> " + tok.decode(out[prompt_tokens:].tolist())
        lines.append(" ".join(text.split()))  # one line: whitespace (code indentation, newlines) collapsed
    return lines
