"""`moe-plugin generate CKPT "prompt" [max_new_tokens=64 temperature=0.8 top_k=50 seed=0 num_samples=1
tokenizer=PATH] [--no-cache] [--json]`: sample text from any checkpoint the plugin writes (a file, an
expert-parallel directory, or `convert from-hf` output), with a key/value cache.

Tokenizer: `tokenizer=PATH` (a local Hugging Face tokenizer folder), else the run's (data.tokenizer.path in its
.hydra/config.yaml), else the tokenizer of the Hugging Face folder the model was imported from, else bytes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

HELP = "Sample text from a checkpoint with a KV cache: generate CKPT 'prompt' [max_new_tokens=N temperature=T top_k=K]."

OPTIONS: dict[str, type] = {
    "max_new_tokens": int,
    "temperature": float,
    "top_k": int,
    "seed": int,
    "num_samples": int,
    "tokenizer": str,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ckpt", help="checkpoint file or expert-parallel checkpoint directory")
    parser.add_argument("prompt", help="text to continue")
    parser.add_argument(
        "overrides", nargs="*", default=[], help="max_new_tokens=64 temperature=0.8 top_k=50 seed=0 ..."
    )
    parser.add_argument("--no-cache", action="store_true", help="recompute the whole sequence each step (slow)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def parse_options(overrides: list[str]) -> dict[str, Any]:
    opts: dict[str, Any] = {"max_new_tokens": 64, "temperature": 0.8, "top_k": 50, "seed": 0, "num_samples": 1}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or key not in OPTIONS:
            raise SystemExit(
                f"moe-plugin generate: {item!r} is not an option; use key=value with key in {sorted(OPTIONS)}."
            )
        try:
            opts[key] = OPTIONS[key](value)
        except ValueError:
            raise SystemExit(f"moe-plugin generate: {key}={value!r} must be {OPTIONS[key].__name__}.") from None
    return opts


def resolve_tokenizer(ckpt: str, explicit: str | None, hf_source: dict[str, Any] | None, vocab_size: int) -> Any:
    from moe_plugin.convert.hf.io import has_tokenizer
    from moe_plugin.convert.hf.source import run_tokenizer
    from moe_plugin.data.tokenizers import ByteTokenizer, HFTokenizer

    path = explicit or run_tokenizer(Path(ckpt))
    if path is None and hf_source and has_tokenizer(hf_source["path"]):
        path = hf_source["path"]
    if path is not None:
        return HFTokenizer(path)
    if vocab_size < 256:
        raise SystemExit(
            f"moe-plugin generate: the model's vocabulary ({vocab_size}) is smaller than bytes and no tokenizer was "
            "found; pass tokenizer=/path/to/hf_tokenizer_folder."
        )
    return ByteTokenizer()


def run(args: argparse.Namespace) -> int:
    import torch

    from moe_plugin.convert.hf.source import CheckpointConfigError, CheckpointSource, load_model
    from moe_plugin.models.generation import generate

    opts = parse_options(args.overrides)
    try:
        model = load_model(args.ckpt)
        hf_source = CheckpointSource(args.ckpt).meta.get("hf_source")
    except (CheckpointConfigError, FileNotFoundError) as err:
        print(f"moe-plugin generate: {err}")
        return 2
    tok = resolve_tokenizer(args.ckpt, opts.get("tokenizer"), hf_source, model.vocab_size)
    prompt = torch.as_tensor(tok.encode(args.prompt.encode("utf-8")), dtype=torch.long)
    eos = getattr(getattr(tok, "_tok", None), "eos_token_id", None)
    if eos is not None and len(prompt) and int(prompt[-1]) == eos:
        prompt = prompt[:-1]  # HFTokenizer.encode appends eos for training documents; a prompt continues
    if len(prompt) == 0:
        print("moe-plugin generate: the prompt is empty after tokenisation; give some text.")
        return 2
    generator = torch.Generator().manual_seed(opts["seed"])
    batch = prompt[None].repeat(opts["num_samples"], 1)
    try:
        out = generate(
            model,
            batch,
            max_new_tokens=opts["max_new_tokens"],
            temperature=opts["temperature"],
            top_k=opts["top_k"],
            use_cache=not args.no_cache,
            generator=generator,
            eos_token_id=eos,
        )
    except ValueError as err:
        print(f"moe-plugin generate: {err}")
        return 2
    texts = [tok.decode(row[len(prompt) :].tolist()) for row in out]
    if args.json:
        print(json.dumps({"prompt": args.prompt, "samples": texts, **opts}))
    else:
        print(("\n" + "-" * 40 + "\n").join(args.prompt + t for t in texts))
    return 0
