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


def _book(path: Path, n: int = 20_000) -> Path:
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex jovial kings".split()
    g = torch.Generator().manual_seed(1)
    path.write_text(" ".join(words[int(i)] for i in torch.randint(0, len(words), (n // 5,), generator=g))[:n])
    return path


def test_a_single_text_file_splits_by_position(tmp_path: Path) -> None:
    book = _book(tmp_path / "book.txt")
    dm = LMDataModule(TextFilesSource([str(book)]), seq_len=64, batch_size=4, val_fraction=0.05, test_fraction=0.05)
    dm.prepare_corpus()
    total = len(book.read_bytes())
    assert dm.fingerprint["split"] == "positions" and dm.stats["documents"] == 1
    assert dm.stats["train_tokens"] + dm.stats["val_tokens"] + dm.stats["test_tokens"] == total
    assert abs(dm.stats["val_tokens"] - 0.05 * total) <= 1 and dm.test_set is not None
    # validation is the text after the training part, test the text after validation
    text = book.read_bytes()
    assert bytes(dm.val_set.tokens[:50].tolist()) == text[dm.stats["train_tokens"] :][:50]
    assert next(iter(dm.train_dataloader())).shape == (4, 65)


def test_many_documents_split_by_document(tmp_path: Path) -> None:
    for i in range(200):
        (tmp_path / f"f{i}.txt").write_text(f"document number {i} " * 20)
    dm = LMDataModule(TextFilesSource([str(tmp_path)]), seq_len=16, val_fraction=0.05)
    dm.prepare_corpus()
    assert dm.fingerprint["split"] == "documents" and dm.stats["documents"] == 200
    # a handful of documents cannot give a 5% held-out split by document: split by position instead
    dm = LMDataModule(TextFilesSource([str(tmp_path / f"f{i}.txt") for i in range(3)]), seq_len=16)
    dm.prepare_corpus()
    assert dm.fingerprint["split"] == "positions"


def test_mixed_files_and_folders_with_home_and_env_vars(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "sub").mkdir()
    _book(tmp_path / "notes" / "a.md", 3000)
    _book(tmp_path / "notes" / "sub" / "b.md", 3000)
    _book(tmp_path / "book.txt", 3000)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("CORPUS_DIR", str(tmp_path / "notes"))
    source = TextFilesSource(["~/book.txt", "$CORPUS_DIR"])
    names = [n for n, _ in source]
    # names are relative to what was listed: the split does not depend on where the corpus lives
    assert names == ["book.txt", "notes/a.md", "notes/sub/b.md"]
    with pytest.raises(ConfigError, match=r"\$NOT_SET_ANYWHERE/x.*environment variable"):
        TextFilesSource(["$NOT_SET_ANYWHERE/x"])


def test_binary_files_are_skipped_with_a_count_and_a_mostly_binary_corpus_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from moe_plugin.data.sources import is_text

    for i in range(3):
        _book(tmp_path / f"t{i}.txt", 2000)
    g = torch.Generator().manual_seed(0)
    (tmp_path / "image.png").write_bytes(bytes(torch.randint(0, 256, (4000,), generator=g).tolist()))
    assert is_text("héllo wörld\n".encode()) and is_text(b"caf\xe9 " + b"x" * 200)  # one Latin-1 byte in 205
    assert not is_text(b"ab\x00cd") and not is_text(bytes(range(128, 256)) * 4)
    with caplog.at_level("WARNING", logger="moe_plugin.data.sources"):
        docs = list(TextFilesSource([str(tmp_path)]))
    assert [n for n, _ in docs] == [f"{tmp_path.name}/t{i}.txt" for i in range(3)]
    assert "skipped 1 of 4 files" in caplog.text and "image.png" in caplog.text
    for i in range(4):
        (tmp_path / f"blob{i}.bin").write_bytes(b"\x00\x01" * 500)
    with pytest.raises(ConfigError, match=r"5 of 8 files are binary.*data\.source\.pattern"):
        list(TextFilesSource([str(tmp_path)]))
    assert len(list(TextFilesSource([str(tmp_path)], pattern="*.txt"))) == 3


def test_checkpoint_fingerprint_refuses_a_changed_corpus(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for i in range(3):
        _book(tmp_path / f"t{i}.txt", 3000 + i)

    def data(**kw) -> LMDataModule:
        dm = LMDataModule(TextFilesSource([str(tmp_path)]), seq_len=32, **kw)
        dm.prepare_corpus()
        return dm

    state = {"epoch": 1, "samples": 48, "corpus": data().state_dict()["corpus"]}
    assert set(state["corpus"]) >= {"documents", "bytes", "files", "train_tokens", "validation_tokens"}
    same = data()
    same.load_state_dict(state)  # the same corpus: no complaint, position restored
    assert same._resume == {"epoch": 1, "samples": 48}
    data().load_state_dict({"epoch": 0, "samples": 8})  # a checkpoint from before fingerprints: not checked
    early = LMDataModule(TextFilesSource([str(tmp_path)]), seq_len=16)
    early.load_state_dict(state)  # restored before setup (a user's own loop): checked when the corpus is read
    with pytest.raises(ConfigError, match="seq_len 32 -> 16"):
        early.prepare_corpus()
    (tmp_path / "t1.txt").write_text((tmp_path / "t1.txt").read_text().replace("fox", "cat", 1))
    changed = data()
    with pytest.raises(ConfigError, match=r"corpus differs.*data\.allow_changed=true") as err:
        changed.load_state_dict(state)
    assert "\n" not in str(err.value) and "train_tokens" in str(err.value)  # same names and sizes, other text
    allowed = data(allow_changed=True)
    with caplog.at_level("WARNING", logger="moe_plugin.data.datamodule"):
        allowed.load_state_dict(state)
    assert "allow_changed" in caplog.text and allowed._resume == {"epoch": 1, "samples": 48}


def test_byte_tokenizer_decodes_ids_beyond_a_byte(tmp_path: Path) -> None:
    from moe_plugin.lightning.evaluate import sample_lines
    from moe_plugin.models.decoder import MoEDecoderLM

    assert ByteTokenizer().decode([104, 105, 300, 0xC3, 0xA9, 256]) == "hi\ufffd\u00e9\ufffd"
    _book(tmp_path / "book.txt", 4000)
    dm = LMDataModule(TextFilesSource([str(tmp_path / "book.txt")]), seq_len=32)
    dm.prepare_corpus()
    torch.manual_seed(0)
    model = MoEDecoderLM(
        vocab_size=512, hidden_size=32, num_layers=1, num_heads=2, head_dim=16, max_seq_len=128,
        moe={"num_experts": 2, "top_k": 1, "expert_hidden_size": 16},
    )  # fmt: skip
    with torch.no_grad():  # only ids >= 256 get logits far from 0: top-k sampling picks them (the old decode crashed)
        model.lm_head.weight[:256] = 0
        model.lm_head.weight[256:] *= 1000
    lines = sample_lines(model, dm, 3)
    assert len(lines) == 3 and all(" |> " in x and "\ufffd" in x.split(" |> ")[1] for x in lines)


def test_val_sequences_reads_the_same_first_windows_at_any_batch_size(tmp_path: Path) -> None:
    book = _book(tmp_path / "book.txt", 60_000)

    def val_rows(batch_size: int, val_sequences: int | None) -> list[torch.Tensor]:
        dm = LMDataModule(TextFilesSource([str(book)]), seq_len=32, batch_size=batch_size, val_sequences=val_sequences)
        dm.setup()
        return [row for batch in dm.val_dataloader() for row in batch]

    whole = val_rows(4, None)
    assert len(whole) > 20
    for bs in (3, 8):
        rows = val_rows(bs, 10)
        assert len(rows) == 10 and all(torch.equal(a, b) for a, b in zip(rows, whole[:10]))
    assert len(val_rows(4, 10_000)) == len(whole)  # more than the split holds: the whole split
    with pytest.raises(ValueError, match=r"data.val_sequences=0 .*null"):
        LMDataModule(TextFilesSource([str(book)]), val_sequences=0)
