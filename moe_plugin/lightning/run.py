"""run(cfg): validate the config, build data, model, module and trainer, train, summarise.

`train.py` is `@hydra.main` around this function; another project can call it with its own composed config.
Returns the final validation loss (the objective of `hparams_search` sweeps).
"""

from __future__ import annotations

import json
import logging
import shutil
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from moe_plugin.config.validate import validate_config
from moe_plugin.convert.hf.load import model_tokenizer
from moe_plugin.errors import ConfigError
from moe_plugin.kernels.host_allocator import keep_freed_host_memory
from moe_plugin.lightning.callbacks.summary import RunSummary
from moe_plugin.lightning.evaluate import format_test, module_for_evaluation, run_test, sample_lines
from moe_plugin.lightning.module import MoELanguageModule
from moe_plugin.lightning.resume import resolve_resume
from moe_plugin.lightning.trainer import build, build_trainer, instantiate_list
from moe_plugin.models.inspect import count_parameters
from moe_plugin.parallel.compile import compile_blocks
from moe_plugin.parallel.recompute import apply_activation_checkpointing

log = logging.getLogger(__name__)


def build_module(cfg: DictConfig, vocab_size: int | None = None) -> MoELanguageModule:
    model_vocab = cfg.model.get("vocab_size")
    if vocab_size is not None and model_vocab is not None and model_vocab < vocab_size:
        raise ConfigError(
            f"model.vocab_size={model_vocab} is smaller than the tokenizer's vocabulary ({vocab_size}). "
            f"Set model.vocab_size={vocab_size} or more."
        )
    model = build(cfg.model, "model", _convert_="partial")
    # model.activation_checkpointing=none|full|selective, applied from outside (parallel/recompute.py),
    # before compilation and sharding wrap the blocks (torchtitan's order)
    apply_activation_checkpointing(
        model,
        getattr(model, "activation_checkpointing", "none"),
        getattr(model, "activation_checkpointing_target", "blocks"),
        getattr(model, "activation_checkpointing_every", 1),
    )
    if getattr(model, "compile_requested", False):  # model.compile=true: regional torch.compile of each block
        compile_blocks(model)
    optim = OmegaConf.to_container(cfg.optim, resolve=True) if cfg.get("optim") else {}
    assert isinstance(optim, dict)
    return MoELanguageModule(model, **optim)


def run(cfg: DictConfig) -> float | None:
    validate_config(cfg, optim_target=MoELanguageModule)
    keep_freed_host_memory()  # no page faults for re-allocated activations (kernels/host_allocator.py)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)  # no "Seed set to" line
    output_dir = Path(cfg.paths.output_dir)

    # Everything that can fail on user input comes first (data, checkpoint to resume from), before the model,
    # the loggers and the trainer exist: a bad corpus or checkpoint path costs a second, not a model build.
    # model=from_hf brings its folder's tokenizer (convert/hf/load.py: model_tokenizer).
    datamodule = build(cfg.data, "data", _convert_="partial", **model_tokenizer(cfg.model))
    if (cfg.get("train", True) or cfg.get("test", False)) and hasattr(datamodule, "prepare_corpus"):
        datamodule.prepare_corpus()
    ckpt_path = resolve_resume(cfg) if cfg.get("train", True) else None
    summary_cb = RunSummary()
    callbacks = [summary_cb, *instantiate_list(cfg.get("callbacks"))]
    loggers = instantiate_list(cfg.get("logger"))
    trainer = build_trainer(cfg, callbacks, loggers)
    # strategy=expert_parallel with sharding builds the model on the meta device (no rank holds it whole)
    init_context = getattr(trainer.strategy, "model_init_context", nullcontext)
    with init_context():
        module = build_module(cfg, getattr(datamodule, "vocab_size", None))
    module = module_for_evaluation(cfg, module)  # train=false ckpt_path=...: the checkpoint's own (real) model
    for lg in trainer.loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))  # type: ignore[arg-type]

    if cfg.get("train", True):
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    metrics: dict[str, Any] = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    # fit's own validation at the final step already measured these weights on the same batches: not twice
    validated_now = cfg.get("train", True) and summary_cb.fit_validated_at_step == trainer.global_step
    if cfg.get("validate_at_end", True) and not (validated_now and "val/loss" in metrics):
        metrics.update(
            {k: float(v) for k, v in trainer.validate(module, datamodule=datamodule, verbose=False)[0].items()}
        )

    test = run_test(trainer, module, datamodule, output_dir, trainer.global_step) if cfg.get("test") else {}

    counts = _whole_model_counts(cfg, module)
    summary = {
        "val_loss": metrics.get("val/loss"),
        "train_loss": metrics.get("train/loss"),
        "steps": trainer.global_step,
        "tokens": summary_cb.tokens,
        "train_seconds": round(summary_cb.train_seconds, 2),
        "tokens_per_second": round(summary_cb.tokens_per_second, 1),
        "total_params": counts.total,
        "active_params": counts.active,
        "run_dir": str(output_dir.resolve()),
        "best_checkpoint": _best_checkpoint(trainer),
        **test,
    }
    if trainer.is_global_zero and trainer.world_size == 1:  # generation on one rank only (EP needs all ranks)
        summary["samples"] = sample_lines(module.model, datamodule, int(cfg.get("sample_lines", 0) or 0))
    if trainer.is_global_zero:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        log.info("summary: %s", json.dumps(summary))
        print(_format_summary(summary))
    _finish_loggers(trainer, summary)
    return summary["val_loss"]


# What Hydra writes into a run folder before our code runs: its config copy and the (possibly empty) log file.
_HYDRA_BOOKKEEPING = (".hydra", "train.log")


def discard_unstarted_run_folder(output_dir: str | Path | None = None) -> bool:
    """Remove the Hydra run folder of a run that stopped on a user error before starting.

    Hydra creates the folder (config copy, log file) before calling `run`; a run that never started leaves
    nothing of value in it. Only a folder holding nothing but that bookkeeping is removed (a resumed run's
    folder has checkpoints and stays), then its parents up to the working directory if they became empty.
    Returns True if something was removed.
    """
    if output_dir is None:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return False
        output_dir = HydraConfig.get().runtime.output_dir
    folder = Path(output_dir).resolve()
    logs = {f"{name}.log" for name in _job_names()}
    cwd = Path.cwd().resolve()
    if folder == cwd or folder in cwd.parents:  # hydra.run.dir=. : the working directory is not ours to remove
        return False
    if not folder.is_dir() or any(p.name not in (*_HYDRA_BOOKKEEPING, *logs) for p in folder.iterdir()):
        return False
    root = logging.getLogger()
    for handler in list(root.handlers):  # Hydra's file handler would re-create the log file on the next record
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).resolve().parent == folder:
            root.removeHandler(handler)
            handler.close()
    shutil.rmtree(folder, ignore_errors=True)
    parent = folder.parent
    while parent != cwd and cwd in parent.parents and parent.is_dir() and not any(parent.iterdir()):
        parent.rmdir()
        parent = parent.parent
    return True


def _job_names() -> list[str]:
    try:
        from hydra.core.hydra_config import HydraConfig

        return [str(HydraConfig.get().job.name)]
    except Exception:  # not under Hydra
        return []


def _finish_loggers(trainer: pl.Trainer, summary: dict[str, Any]) -> None:
    """Put the summary in the W&B run and close it, so an offline run folder is complete (and a multirun's
    next job starts a new run)."""
    from lightning.pytorch.loggers import WandbLogger

    for lg in trainer.loggers:
        if isinstance(lg, WandbLogger) and trainer.is_global_zero and lg._experiment is not None:
            lg.experiment.summary.update({f"summary/{k}": v for k, v in summary.items() if v is not None})
            lg.experiment.finish()


def _whole_model_counts(cfg: DictConfig, module: MoELanguageModule) -> Any:
    """Counts of the whole model: under expert parallelism a rank holds only its experts, so count a meta-device
    copy built from the same config (no memory)."""
    try:
        with torch.device("meta"):
            return count_parameters(instantiate(cfg.model, _convert_="partial"))
    except Exception:  # a model class that cannot be built on meta: the local module is the best we have
        return count_parameters(module.model)


def _best_checkpoint(trainer: pl.Trainer) -> str | None:
    cb = trainer.checkpoint_callback
    path = getattr(cb, "best_model_path", "") or getattr(cb, "last_model_path", "")
    return path or None


def _format_summary(s: dict[str, Any]) -> str:
    val = f"{s['val_loss']:.4f}" if s["val_loss"] is not None else "n/a"
    return (
        "\n== moe_plugin run summary ==\n"
        f"  val loss        {val}  (uniform byte baseline ln 256 = 5.545)\n"
        f"  steps / tokens  {s['steps']} / {s['tokens']:,}\n"
        f"  tokens/s        {s['tokens_per_second']:,.0f}\n"
        f"  params          {s['total_params'] / 1e6:.2f}M total, {s['active_params'] / 1e6:.2f}M active\n"
        f"  run folder      {s['run_dir']}\n"
        f"  checkpoint      {s['best_checkpoint']}\n"
        + (format_test(s) if "test/loss" in s else "")
        + "".join(f"  sample          {line[:150]}\n" for line in s.get("samples") or [])
    )
