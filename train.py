"""Train an MoE language model: python train.py [group=option ...] [key=value ...]

    python train.py                                   # ling_tiny on the stdlib corpus, W&B offline
    python train.py model=mixtral_tiny logger=csv     # another family, another logger
    python train.py -m optim.lr=1e-3,2e-3             # a sweep
    python train.py -m hparams_search=optuna          # an Optuna sweep

See docs/configuration.md for every group and key.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

import moe_plugin  # noqa: F401  (registers strategies and accelerators with Lightning)
from moe_plugin.config.validate import ConfigError
from moe_plugin.lightning.run import run


@hydra.main(version_base="1.3", config_path="moe_plugin/conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        return run(cfg)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
