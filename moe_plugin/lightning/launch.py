"""Cluster launchers: the environment a process started by submitit's local executor needs for Lightning.

On SLURM (`hydra/launcher=submitit_slurm`, experiment=slurm_expert_parallel) every task is an `srun` process
and Lightning's SLURMEnvironment reads SLURM's variables: nothing to do. submitit's LocalExecutor (used to test
the same launcher config without a cluster) starts one process per task without them; this exports the
torchelastic variables from submitit's JobEnvironment, so Lightning sees a launched job of that size instead
of launching processes of its own.
"""

from __future__ import annotations

import os


def export_submitit_environment() -> bool:
    """Set RANK/WORLD_SIZE/LOCAL_RANK/... from submitit inside a LocalExecutor task; True if it did."""
    if "SLURM_JOB_ID" in os.environ or "TORCHELASTIC_RUN_ID" in os.environ:
        return False
    try:
        import submitit
    except ImportError:
        return False
    try:
        env = submitit.JobEnvironment()
    except RuntimeError:  # not inside a submitit job
        return False
    dist = submitit.helpers.TorchDistributedEnvironment()
    os.environ.update(
        {
            "MASTER_ADDR": dist.master_addr,
            "MASTER_PORT": str(dist.master_port),
            "RANK": str(env.global_rank),
            "WORLD_SIZE": str(env.num_tasks),
            "LOCAL_RANK": str(env.local_rank),
            "LOCAL_WORLD_SIZE": str(env.num_tasks // max(1, env.num_nodes)),
            "GROUP_RANK": str(env.node),
            # names the shared run folder too (conf/hydra/default.yaml: moe_run_id)
            "TORCHELASTIC_RUN_ID": f"submitit-{env.job_id}",
        }
    )
    return True
