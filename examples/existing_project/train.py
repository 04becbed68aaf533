"""Train the language model: python train.py [key=value ...]"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
import lightning.pytorch as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from my_project.lit import LitLM
from omegaconf import DictConfig

import moe_plugin  # noqa: F401  (registers strategy="expert_parallel" with Lightning)
from moe_plugin.lightning.trainer import resolve_strategy


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    L.seed_everything(cfg.seed)
    data = instantiate(cfg.data)
    model = instantiate(cfg.model, vocab_size=data.vocab_size)
    if cfg.init_from:  # start from the weights of an earlier run of this project
        state = torch.load(cfg.init_from, map_location="cpu", weights_only=True)["state_dict"]
        model.load_state_dict({k.removeprefix("model."): v for k, v in state.items()})
    model = instantiate(cfg.moefy)(model)
    lit = LitLM(model, **cfg.optim)

    out = Path(HydraConfig.get().runtime.output_dir)
    trainer = L.Trainer(default_root_dir=out, strategy=resolve_strategy(cfg), **cfg.trainer)
    first_val = trainer.validate(lit, datamodule=data, verbose=False)[0]["val_loss"]
    trainer.fit(lit, datamodule=data)
    if trainer.is_global_zero:
        result = {
            "first_val_loss": first_val,
            "train_loss": float(trainer.callback_metrics["train_loss"]),
            "val_loss": float(trainer.callback_metrics["val_loss"]),
            "params": sum(p.numel() for p in lit.parameters()),
            "checkpoint": trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else None,
        }
        (out / "result.json").write_text(json.dumps(result, indent=2))
        print(json.dumps(result))


if __name__ == "__main__":
    main()
