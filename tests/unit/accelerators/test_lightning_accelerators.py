"""Our Lightning accelerators and strategies: registered by name, real on CPU, vendor logic simulated."""

from __future__ import annotations

import contextlib

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.accelerators import AcceleratorRegistry
from lightning.pytorch.strategies import StrategyRegistry
from lightning.pytorch.utilities.exceptions import MisconfigurationException

import moe_plugin  # noqa: F401  (registers on import)
from moe_plugin.accelerators import lightning_accelerators as la
from moe_plugin.accelerators.resolve import resolve_accelerator
from tests.vendor_sim import detection


def test_vendor_names_are_registered_on_import() -> None:
    for name in ("npu", "xpu", "mlu", "musa"):
        assert AcceleratorRegistry[name]["accelerator"] is la.ACCELERATORS[name]
        assert la.ACCELERATORS[name].name() == name
        assert f"single_{name}" in StrategyRegistry and f"ddp_{name}" in StrategyRegistry
    assert StrategyRegistry["ddp_npu"]["init_params"] == {"process_group_backend": "hccl"}
    la.register_all()  # idempotent: a second import path must not raise "already registered"


def test_absent_vendor_refused_by_lightning_itself() -> None:
    with pytest.raises(MisconfigurationException, match="NPUAccelerator` can not run"):
        pl.Trainer(accelerator="npu", devices=1, logger=False)


def test_simulated_presence_drives_availability_and_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    det = detection(devices={"xpu": 4})
    monkeypatch.setattr(la, "detected", lambda: det)
    acc = la.XPUAccelerator
    assert acc.is_available() and acc.auto_device_count() == 4
    assert acc.parse_devices("auto") == [0, 1, 2, 3]
    assert acc.parse_devices(2) == [0, 1]
    assert acc.parse_devices("1,3") == [1, 3]
    assert acc.get_parallel_devices([1, 3]) == [torch.device("xpu", 1), torch.device("xpu", 3)]
    assert not la.MLUAccelerator.is_available()
    with pytest.raises(ValueError, match="drives 'xpu' devices"):
        acc().setup_device(torch.device("cpu"))


def test_vendor_ddp_uses_vendor_backend_and_no_cuda_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    """The branch that matters on NPU/XPU: DDP is built without torch.cuda.stream. The vendor device
    itself cannot exist here, so DistributedDataParallel is replaced by a recorder."""
    strategy = la.VendorDDPStrategy(parallel_devices=[torch.device("xpu", 0), torch.device("xpu", 1)])
    strategy.set_world_ranks = lambda: None  # type: ignore[method-assign]
    monkeypatch.setattr(type(strategy), "root_device", property(lambda self: torch.device("xpu", 1)))
    assert strategy._get_process_group_backend() == "xccl"
    built = {}

    def recorder(module, device_ids, **kwargs):  # type: ignore[no-untyped-def]
        built.update(device_ids=device_ids)
        return module

    def no_cuda_stream(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("a CUDA stream was requested for an xpu device")

    monkeypatch.setattr(la, "DistributedDataParallel", recorder)
    monkeypatch.setattr(torch.cuda, "Stream", no_cuda_stream)
    model = torch.nn.Linear(2, 2)
    assert strategy._setup_model(model) is model
    assert built["device_ids"] == [1]


def test_precision_plugin_refuses_bf16_where_the_vendor_lacks_it() -> None:
    from dataclasses import replace

    no_bf16 = replace(la.PROFILES["musa"], bf16=False)
    with pytest.raises(ValueError, match="trainer.precision='bf16-mixed'.*16-mixed"):
        la.vendor_precision_plugin("bf16-mixed", no_bf16)
    assert la.vendor_precision_plugin("bf16-mixed", la.PROFILES["cuda"]) is None  # Lightning does it right


class _Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)
        self.dtypes: list[torch.dtype] = []

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        out = self.lin(batch)
        self.dtypes.append(out.dtype)
        return out.float().pow(2).mean()

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):  # type: ignore[no-untyped-def]
        return torch.utils.data.DataLoader(torch.randn(8, 8), batch_size=4)


def test_cpu_trainer_from_resolved_arguments_runs_with_bf16_autocast(tmp_path) -> None:
    kwargs = resolve_accelerator("auto", devices=1, precision="bf16-mixed").trainer_kwargs
    if torch.accelerator.is_available():
        pytest.skip("this test runs the CPU path; an accelerator is present")
    trainer = pl.Trainer(
        **kwargs,
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    module = _Tiny()
    trainer.fit(module)
    assert trainer.global_step == 2
    assert module.dtypes == [torch.bfloat16, torch.bfloat16]  # autocast ran on the CPU device type
    with contextlib.suppress(Exception):
        trainer.accelerator.teardown()


class _Report(pl.Callback):
    """Each rank writes what it ran with (spawned processes do not send trainer state back)."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from torch.nn.parallel import DistributedDataParallel

        backend = torch.distributed.get_backend()
        wrapped = isinstance(trainer.strategy.model, DistributedDataParallel)
        weight = float(pl_module.lin.weight.sum())
        with open(f"{self.out_dir}/rank{trainer.global_rank}.txt", "w") as f:
            f.write(f"{trainer.global_step} {backend} {wrapped} {weight:.8f}")


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_vendor_ddp_trains_for_real_on_two_cpu_processes(tmp_path) -> None:
    """The CPU path of VendorDDPStrategy: two spawned processes on gloo, gradients all-reduced."""
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=la.VendorDDPStrategy(start_method="spawn"),
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[_Report(str(tmp_path))],
    )
    trainer.fit(_Tiny())
    reports = [(tmp_path / f"rank{r}.txt").read_text().split() for r in (0, 1)]
    for steps, backend, wrapped, _ in reports:
        assert (steps, backend, wrapped) == ("2", "gloo", "True")
    assert reports[0][3] == reports[1][3]  # ranks saw different batches, same all-reduced update
