"""Sampling text from a decoder with a key/value cache.

Shapes: B batch, S prompt length, N new tokens, V vocabulary.

    logits_BV = model(last tokens, cache)[:, -1]          (the whole prompt on the first step)
    greedy (temperature == 0):  next = argmax(logits)
    otherwise:                  next ~ softmax(top_k(logits) / temperature)

With `use_cache=False` every step recomputes the whole sequence: the slow, obvious reference the cached path
is tested against (same tokens under greedy decoding, same logits to float rounding).
"""

from __future__ import annotations

import torch
from torch import nn


def sample_next(
    logits_BV: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None
) -> torch.Tensor:
    """One token per row [B] from the last position's logits."""
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy).")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k} must be >= 1, or unset for the whole vocabulary.")
    if temperature == 0:
        return logits_BV.argmax(dim=-1)
    logits_BV = logits_BV.float() / temperature
    if top_k is not None and top_k < logits_BV.shape[-1]:
        kth_B1 = torch.topk(logits_BV, top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    probs_BV = torch.softmax(logits_BV, dim=-1)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: nn.Module,
    input_ids_BS: torch.Tensor,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_k: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    eos_token_id: int | None = None,
) -> torch.Tensor:
    """Prompt + up to `max_new_tokens` sampled tokens [B, S + N] (stops early when every row emitted eos)."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0.")
    if input_ids_BS.dim() != 2 or input_ids_BS.shape[1] == 0:
        raise ValueError("generate needs a non-empty prompt of shape [batch, length].")
    max_len = getattr(model, "max_seq_len", None)
    if max_len is not None and input_ids_BS.shape[1] + max_new_tokens > max_len:
        raise ValueError(
            f"prompt ({input_ids_BS.shape[1]} tokens) + max_new_tokens={max_new_tokens} exceeds the model's "
            f"max_seq_len={max_len}; ask for fewer tokens."
        )
    was_training = model.training
    model.eval()
    cache = model.new_cache() if use_cache else None  # type: ignore[operator]
    ids_BT = input_ids_BS
    step_ids = input_ids_BS
    done_B = torch.zeros(ids_BT.shape[0], dtype=torch.bool, device=ids_BT.device)
    try:
        for _ in range(max_new_tokens):
            logits_BSV = model(step_ids, cache=cache) if use_cache else model(ids_BT)
            next_B = sample_next(logits_BSV[:, -1], temperature, top_k, generator)
            ids_BT = torch.cat([ids_BT, next_B[:, None]], dim=1)
            step_ids = next_B[:, None]
            if eos_token_id is not None:
                done_B |= next_B == eos_token_id
                if bool(done_B.all()):
                    break
    finally:
        model.train(was_training)
    return ids_BT
