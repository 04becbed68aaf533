from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moe_plugin.data.datamodule import LMDataModule, is_validation
from moe_plugin.data.sampler import GlobalOrderSampler
from moe_plugin.data.sources import HFDiskDatasetSource, StdlibSource, TextFilesSource
from moe_plugin.data.tokenizers import ByteTokenizer, HFTokenizer
from moe_plugin.errors import ConfigError


def test_stdlib_source_is_real_text_and_deterministic() -> None:
    docs = list(StdlibSource(max_bytes=200_000))
    names = [n for n, _ in docs]
    assert names == sorted(names) and len(docs) > 3
    assert not any("site-packages" in n for n in names)
    assert b"def " in b"".join(d for _, d in docs)
    assert [n for n, _ in StdlibSource(max_bytes=200_000)] == names


def test_split_is_by_document_name_and_stable() -> None:
    names = [f"doc{i}" for i in range(2000)]
    val = [n for n in names if is_validation(n, 0.05)]
    assert 50 < len(val) < 150
    assert val == [n for n in names if is_validation(n, 0.05)]


def test_datamodule_windows_are_shifted_pairs(tmp_path: Path) -> None:
    for i in range(20):
        (tmp_path / f"f{i}.txt").write_text(f"document number {i} " * 50)
    dm = LMDataModule(TextFilesSource([str(tmp_path)]), seq_len=32, batch_size=4, val_fraction=0.2)
    dm.setup()
    sample = dm.train_set[0]
    assert sample.shape == (33,) and sample.dtype == torch.long
    text = ByteTokenizer().decode(dm.train_set.tokens[:33].tolist())
    assert ByteTokenizer().decode(sample.tolist()) == text
    batch = next(iter(dm.train_dataloader()))
    assert batch.shape == (4, 33)
    assert dm.stats["documents"] == 20 and dm.stats["val_tokens"] > 0


def test_missing_and_empty_paths_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data\.source\.paths"):
        TextFilesSource([str(tmp_path / "nope")])
    with pytest.raises(ValueError, match=r"data\.source\.paths"):
        TextFilesSource([])
    (tmp_path / "empty").mkdir()
    dm = LMDataModule(TextFilesSource([str(tmp_path / "empty")]), seq_len=8)
    with pytest.raises(ConfigError, match="empty"):
        dm.setup()
    (tmp_path / "small.txt").write_text("abc")
    (tmp_path / "small2.txt").write_text("def")
    dm = LMDataModule(TextFilesSource([str(tmp_path / "small.txt"), str(tmp_path / "small2.txt")]), seq_len=64)
    with pytest.raises(ValueError, match=r"data\.seq_len"):
        dm.setup()
    with pytest.raises(ConfigError, match=r"data\.source\.path"):
        HFDiskDatasetSource(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match=r"data\.tokenizer\.path"):
        HFTokenizer(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match=r"data\.val_fraction"):
        LMDataModule(TextFilesSource([str(tmp_path)]), val_fraction=1.5)


def test_hf_disk_dataset_source(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["hello world " * 20, "", "second doc " * 20]}).save_to_disk(
        str(tmp_path / "ds")
    )
    docs = list(HFDiskDatasetSource(str(tmp_path / "ds")))
    assert len(docs) == 2 and docs[0][1].startswith(b"hello")
    with pytest.raises(KeyError, match="text_field"):
        list(HFDiskDatasetSource(str(tmp_path / "ds"), text_field="body"))


def _global_batches(n: int, bs: int, world: int, seed: int = 3, start: int = 0) -> list[list[int]]:
    per_rank = [list(GlobalOrderSampler(n, bs, r, world, seed=seed, start_sample=start)) for r in range(world)]
    steps = len(per_rank[0]) // bs
    return [sorted(i for r in range(world) for i in per_rank[r][s * bs : (s + 1) * bs]) for s in range(steps)]


def test_sampler_same_global_batches_at_any_world_size() -> None:
    one = _global_batches(100, 8, 1)
    two = _global_batches(100, 4, 2)
    four = _global_batches(100, 2, 4)
    assert one == two == four and len(one) == 12
    flat = [i for b in one for i in b]
    assert len(set(flat)) == len(flat)  # no sample twice in an epoch


def test_sampler_resumes_mid_epoch_at_another_world_size() -> None:
    full = _global_batches(100, 8, 1)
    resumed = _global_batches(100, 4, 2, start=5 * 8)
    assert resumed == full[5:]


def test_sampler_epochs_differ_and_set_epoch_clears_offset() -> None:
    s = GlobalOrderSampler(50, 5, seed=1, start_sample=10)
    first = list(s)
    assert len(first) == 40
    s.set_epoch(1)
    assert s.start_sample == 0 and list(s) != first and len(list(s)) == 50
