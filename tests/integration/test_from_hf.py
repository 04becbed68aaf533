"""Continue training from a local Hugging Face folder (`model=from_hf model.path=...`, its tokenizer included),
upcycle a dense one (`model=from_hf_upcycle`), then export the run's checkpoint and sample from it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

SMALL = ["trainer=debug", "logger=csv", "data.seq_len=32", "data.batch_size=4", "data.source.max_bytes=300000"]


def _tokenizer(folder: Path) -> int:
    """A byte-level BPE trained offline on a few lines of Python, saved as a Hugging Face tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(["def f(x):\n    return x + 1\n", "import os\nclass A:\n    pass\n"] * 50, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")
    fast.save_pretrained(folder)
    return len(fast)


def _folder(tmp_path: Path, kind: str) -> Path:
    folder = tmp_path / kind
    vocab = _tokenizer(folder)
    common = dict(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    if kind == "olmoe":
        cfg = transformers.OlmoeConfig(
            **common, intermediate_size=32, num_experts=4, num_experts_per_tok=2, pad_token_id=0, eos_token_id=1
        )
    else:
        cfg = transformers.LlamaConfig(**common, intermediate_size=48)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    return folder


def test_continue_training_export_and_generate(train, tmp_path: Path) -> None:
    folder = _folder(tmp_path, "olmoe")
    out = tmp_path / "run"
    train(
        "model=from_hf", f"model.path={folder}", *SMALL, f"paths.output_dir={out}", "trainer.max_steps=3", "test=true"
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["test/loss"] > 0
    # bits per byte use the test split's bytes per token (a BPE token is several bytes)
    assert summary["test/bits_per_byte"] < summary["test/loss"] / 0.6931

    from moe_plugin.cli.main import main

    ckpt = summary["best_checkpoint"]
    assert main(["convert", "to-hf", ckpt, str(tmp_path / "hf"), "--json"]) == 0
    assert (tmp_path / "hf" / "tokenizer.json").is_file()  # the run's tokenizer travels with the model
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True)
    assert model.config.model_type == "olmoe" and model.config.eos_token_id == 1
    assert main(["generate", ckpt, "def f", "max_new_tokens=5", "temperature=0"]) == 0


def test_upcycle_dense_folder(train, tmp_path: Path) -> None:
    folder = _folder(tmp_path, "llama")
    out = tmp_path / "run"
    train(
        "model=from_hf_upcycle",
        f"model.path={folder}",
        "model.moefy.num_experts=4",
        *SMALL,
        f"paths.output_dir={out}",
        "trainer.max_steps=2",
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["total_params"] > summary["active_params"]  # an MoE now
