"""Which checkpoint a run starts from: `ckpt_path=...`, or `resume=auto|never|<folder or checkpoint>`.

    ckpt_path=P         resume from P exactly (Lightning's own behaviour; P is verified on load)
    resume=auto         (default) the newest VALID checkpoint in this run's checkpoint folder, else start fresh
    resume=never        always start fresh
    resume=<path>       the newest valid checkpoint in that folder, or that checkpoint if it is valid

`auto` only looks inside this run's own folder (`callbacks.model_checkpoint.dirpath`, by default
`<paths.output_dir>/checkpoints`), so a new timestamped run never picks up another run's state by surprise.
To resume after a crash, start again in the same folder: `hydra.run.dir=outputs/my_run` on both commands, or
launch with torchrun, whose restarts (`--max-restarts`) share TORCHELASTIC_RUN_ID, which names the run folder
(see conf/hydra/default.yaml and moe_plugin.config.resolvers).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from omegaconf import DictConfig

from moe_plugin.config.validate import expand_path
from moe_plugin.errors import ConfigError
from moe_plugin.lightning.checkpoint_io import check_checkpoint, find_latest_valid, remove_stale_temporaries

log = logging.getLogger(__name__)

RESUME_MODES = ("auto", "never")


def checkpoint_folder(cfg: DictConfig) -> Path:
    """The folder ModelCheckpoint writes to: callbacks.model_checkpoint.dirpath or <paths.output_dir>/checkpoints."""
    node = (cfg.get("callbacks") or {}).get("model_checkpoint") or {}
    dirpath = node.get("dirpath") if hasattr(node, "get") else None
    return Path(dirpath) if dirpath else Path(cfg.paths.output_dir) / "checkpoints"


def resolve_resume(cfg: DictConfig) -> str | None:
    """The checkpoint path to pass to trainer.fit(ckpt_path=...), or None for a fresh start."""
    explicit = cfg.get("ckpt_path")
    if explicit:
        return expand_path(str(explicit))
    resume = cfg.get("resume", "auto")
    if resume is None or resume is False or resume == "never":
        return None
    if resume == "auto":
        folder = checkpoint_folder(cfg)
    else:
        target = Path(expand_path(str(resume)))
        if not target.exists():
            raise ConfigError(
                f"resume={resume!r}: no such file or folder. Use resume=auto, resume=never, or the path of a "
                "checkpoint or of a checkpoint folder."
            )
        if target.is_file() or (target / "meta.pt").exists():
            check = check_checkpoint(target)
            if not check.valid:
                raise ConfigError(f"resume={resume!r} is not a valid checkpoint: {check.reason}. Pick an earlier one.")
            log.info("resume: from %s (%s)", target, check.reason)
            return str(target)
        folder = target
    if os.environ.get("RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0":
        remove_stale_temporaries(folder)  # partial files of writes killed in earlier runs (can be GBs each)
    latest = find_latest_valid(folder)
    if latest is None:
        log.info("resume=%s: no valid checkpoint in %s, starting fresh", resume, folder)
        return None
    log.warning("resume=%s: resuming from %s", resume, latest)
    return str(latest)
