"""Host allocator tuning (kernels/host_allocator.py): applied on glibc, skipped on the user's request, and it
does what it is for: re-allocating an activation-sized tensor no longer page-faults. Each case runs in a
fresh interpreter (mallopt changes the whole process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]

PROBE = textwrap.dedent(
    """
    import json, resource, sys
    import torch
    from moe_plugin.kernels.host_allocator import keep_freed_host_memory
    applied = keep_freed_host_memory() if sys.argv[1] == "tune" else False
    def step():  # a training step's pattern: allocate activation-sized tensors, free them
        ts = [torch.ones(2048, 1024) for _ in range(3)]  # 8 MiB each: above glibc's initial mmap threshold
        del ts
    step(); step()
    per_step = []
    for _ in range(5):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        step()
        per_step.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    # the quietest step: a one-off burst (the VM reclaiming idle pages, THP compaction) hits one step, not all
    print(json.dumps({"applied": applied, "faults_per_step": min(per_step)}))
    """
)


def _probe(mode: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    clean.pop("MOE_PLUGIN_HOST_ALLOCATOR", None)
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode],
        env={**clean, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_tuning_removes_page_faults_of_reallocated_activations():
    plain, tuned = _probe("plain"), _probe("tune")
    assert tuned["applied"] is True
    # 3 x 8 MiB per step = 6,144 pages: with the tuning none of them faults again
    assert plain["faults_per_step"] >= tuned["faults_per_step"]  # glibc may already reuse some blocks untuned
    assert tuned["faults_per_step"] < 100


@pytest.mark.parametrize("env", [{"MOE_PLUGIN_HOST_ALLOCATOR": "default"}, {"MALLOC_MMAP_THRESHOLD_": "131072"}])
def test_skipped_when_the_user_chose(env):
    assert _probe("tune", **env)["applied"] is False
