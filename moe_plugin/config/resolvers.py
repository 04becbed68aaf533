"""OmegaConf resolvers used by the packaged Hydra config (registered when moe_plugin is imported).

    ${moe_run_id:<fallback>}   TORCHELASTIC_RUN_ID when launched by torchrun (every worker and every restart of
                               one torchrun job share it), else <fallback> (the timestamp)

conf/hydra/default.yaml names the run folder with it, so all ranks of a torchrun job and its elastic restarts
(`--max-restarts`) write to, and resume=auto reads from, the same folder.
"""

from __future__ import annotations

import os

from omegaconf import OmegaConf


def run_id(fallback: str) -> str:
    rid = os.environ.get("TORCHELASTIC_RUN_ID", "")
    # torchrun's default --rdzv-id is the literal "none": not an identity, every job would share it
    return f"torchrun-{rid}" if rid and rid != "none" else str(fallback)


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("moe_run_id"):
        OmegaConf.register_new_resolver("moe_run_id", run_id)
