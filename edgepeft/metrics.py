"""Measurements shared by the stages: exact match of greedy answers, and agreement between two models'
logits on the same text."""

from __future__ import annotations

from collections.abc import Callable

import torch

from edgepeft.data import Sample, collate, prompt_ids


def text_match(prediction: str, reference: str) -> bool:
    return prediction.strip() == reference.strip()


@torch.no_grad()
def greedy_answers(model, tokenizer, samples: list[Sample], batch_size: int = 16, max_new_tokens: int = 48,
                   progress: Callable | None = None) -> list[str]:
    """Greedy answers to each sample's prompt, batched with left padding."""
    model.eval()
    dev = next(p for p in model.parameters()).device
    prompts = [prompt_ids(tokenizer, s) for s in samples]
    answers = []
    stop = [t for t in {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
            if isinstance(t, int) and t >= 0 and t != tokenizer.unk_token_id]
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        batch = collate([(p, p) for p in chunk], tokenizer.pad_token_id)
        n = batch["input_ids"].shape[1]
        out = model.generate(input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev),
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=stop)
        answers += tokenizer.batch_decode(out[:, n:], skip_special_tokens=True)
        if progress:
            progress(len(chunk))
    return answers


def exact_match(model, tokenizer, samples: list[Sample], match: Callable[[str, str], bool] = text_match,
                **kwargs) -> tuple[float, list[str]]:
    samples = [s for s in samples if s.reference is not None]
    if not samples:
        return float("nan"), []
    answers = greedy_answers(model, tokenizer, samples, **kwargs)
    hits = sum(match(a, s.reference) for a, s in zip(answers, samples, strict=True))
    return hits / len(samples), answers


@torch.no_grad()
def compare_logits(reference, candidate, windows: list[list[int]]) -> dict[str, float]:
    """Largest absolute logit difference and next-token (argmax) agreement of candidate vs reference."""
    reference.eval()
    candidate.eval()
    worst, agree, total = 0.0, 0, 0
    for w in windows:
        ids = torch.tensor([w])
        a = reference(input_ids=ids.to(next(reference.parameters()).device)).logits.float().cpu()
        b = candidate(input_ids=ids.to(next(candidate.parameters()).device)).logits.float().cpu()
        worst = max(worst, (a - b).abs().max().item())
        agree += (a.argmax(-1) == b.argmax(-1)).sum().item()
        total += a.shape[1]
    return {"max_logit_diff": worst, "next_token_agreement": agree / max(total, 1), "tokens": total}
