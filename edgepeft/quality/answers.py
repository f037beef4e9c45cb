"""Task accuracy in PyTorch: greedy answers to a task's prompts and their exact match with the references
(the task's own matcher: the built-in phone commands and calendar events compare parsed JSON, other data the
stripped text)."""

from __future__ import annotations

from collections.abc import Callable

from edgepeft.calib import calendar_events, phone_commands
from edgepeft.calib.data import BUILTIN_PREFIX, Sample, collate, prompt_ids


def text_match(prediction: str, reference: str) -> bool:
    return prediction.strip() == reference.strip()


def matcher(data: str) -> Callable[[str, str], bool]:
    """How answers to the recipe's ``[train] data`` are scored."""
    if data == f"{BUILTIN_PREFIX}phone-commands":
        return phone_commands.exact_match
    if data == f"{BUILTIN_PREFIX}calendar-events":
        return calendar_events.exact_match
    return text_match


BATCH = 16  # prompts per generate call (left-padded): part of what decides the answers, so of the cache's key


def greedy_answers(model, tokenizer, samples: list[Sample], batch_size: int = BATCH, max_new_tokens: int = 48,
                   progress: Callable | None = None) -> list[str]:
    """Greedy answers to each sample's prompt, batched with left padding."""
    import torch

    with torch.no_grad():
        return _greedy_answers(model, tokenizer, samples, batch_size, max_new_tokens, progress)


def _greedy_answers(model, tokenizer, samples, batch_size, max_new_tokens, progress) -> list[str]:
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
    return share_matched(answers, samples, match), answers


def share_matched(answers: list[str], samples: list[Sample], match: Callable[[str, str], bool]) -> float:
    """The share of ``answers`` that ``match`` their samples' references."""
    return sum(match(a, s.reference) for a, s in zip(answers, samples, strict=True)) / len(samples)
