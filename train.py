"""Train an MoE language model: python train.py [group=option ...] [key=value ...]

    python train.py                                   # ling_tiny on the stdlib corpus, W&B offline
    python train.py model=mixtral_tiny logger=csv     # another family, another logger
    python train.py -m optim.lr=1e-3,2e-3             # a sweep
    python train.py -m hparams_search=optuna          # an Optuna sweep

See docs/configuration.md for every group and key. A user error (bad config value, missing or unsafe
checkpoint, empty corpus, full disk) prints one line and exits with status 2, leaving no run folder behind.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

import moe_plugin  # noqa: F401  (registers strategies and accelerators with Lightning)
from moe_plugin.cli.compose import check_command_line
from moe_plugin.errors import USER_ERROR_EXIT, ConfigError, UserError
from moe_plugin.lightning.launch import export_submitit_environment
from moe_plugin.lightning.run import discard_unstarted_run_folder, run


@hydra.main(version_base="1.3", config_path="moe_plugin/conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    export_submitit_environment()  # a submitit LocalExecutor task: tell Lightning its rank (lightning/launch.py)
    try:
        return run(cfg)
    except UserError as err:
        discard_unstarted_run_folder()
        kind = "config error" if isinstance(err, ConfigError) else "error"
        print(f"{kind}: {err}", file=sys.stderr)
        raise SystemExit(USER_ERROR_EXIT) from None


if __name__ == "__main__":
    try:  # override errors (model=nope, a misspelt key, bad syntax): one line and exit 2, as for any user error
        check_command_line(sys.argv[1:])
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        raise SystemExit(USER_ERROR_EXIT) from None
    main()
