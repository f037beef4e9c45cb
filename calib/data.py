"""Training and evaluation data: JSONL in the common shapes, or a built-in task from ``calib/``.

One JSON object per line, in any of three shapes (a file may mix them):

- ``{"text": "..."}``: plain text, loss on every token;
- ``{"prompt": "...", "completion": "..."}``: loss on the completion only (the tokenizer's EOS is appended so
  the model learns to stop);
- ``{"messages": [{"role": ..., "content": ...}, ...]}``: rendered with the tokenizer's chat template, loss
  on the assistant turns only.

Examples with a prompt (the last two shapes, when the conversation ends with the assistant) are also
scored by exact match of a greedy answer against the reference.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from edgepeft.calib import calendar_events, phone_commands

from edgepeft.core.errors import EdgepeftError
from edgepeft.core.files import BUILTIN_PREFIX, resolve_path

IGNORE = -100
BUILTIN_TASKS = {"phone-commands": phone_commands, "calendar-events": calendar_events}  # name -> generator


@dataclass(frozen=True)
class Sample:
    text: str | None = None
    prompt: str | None = None
    completion: str | None = None
    messages: tuple | None = None  # tuple of (role, content)

    @property
    def reference(self) -> str | None:
        if self.completion is not None:
            return self.completion
        if self.messages and self.messages[-1][0] == "assistant":
            return self.messages[-1][1]
        return None


def _sample_from(obj, where: str) -> Sample:
    if not isinstance(obj, dict):
        raise EdgepeftError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise EdgepeftError(f"{where}: 'messages' must be a non-empty list")
        out = []
        for m in msgs:
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise EdgepeftError(f"{where}: each message needs string 'role' and 'content'")
            out.append((m["role"], m["content"]))
        if not any(r == "assistant" for r, _ in out):
            raise EdgepeftError(f"{where}: no assistant message to learn from")
        return Sample(messages=tuple(out))
    if "prompt" in obj or "completion" in obj:
        p, c = obj.get("prompt"), obj.get("completion")
        if not (isinstance(p, str) and isinstance(c, str)) or not c:
            raise EdgepeftError(f"{where}: 'prompt' and 'completion' must both be strings, completion non-empty")
        return Sample(prompt=p, completion=c)
    if "text" in obj:
        if not isinstance(obj["text"], str) or not obj["text"].strip():
            raise EdgepeftError(f"{where}: 'text' must be a non-empty string")
        return Sample(text=obj["text"])
    keys = ", ".join(sorted(obj)) or "none"
    raise EdgepeftError(f"{where}: unknown example shape (keys: {keys}); expected 'text', "
                        "'prompt'+'completion' or 'messages'")


def read_jsonl(path: Path) -> list[Sample]:
    if not path.is_file():
        raise EdgepeftError(f"data file not found: {path}")
    samples = []
    with path.open("rb") as f:
        for i, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise EdgepeftError(f"{path}:{i}: not UTF-8 text (byte {e.start} of the line)") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise EdgepeftError(f"{path}:{i}: malformed JSON ({e.msg})") from None
            samples.append(_sample_from(obj, f"{path}:{i}"))
    if not samples:
        raise EdgepeftError(f"{path}: no examples (empty file)")
    return samples


def builtin_splits(name: str, sizes: dict[str, int] | None = None, seed: int = 0) -> dict[str, list[Sample]]:
    if name not in BUILTIN_TASKS:
        raise EdgepeftError(f"unknown built-in data {BUILTIN_PREFIX}{name} (known: "
                            + ", ".join(BUILTIN_PREFIX + t for t in BUILTIN_TASKS) + ")")

    splits = BUILTIN_TASKS[name].generate(sizes, seed)
    return {k: [Sample(messages=tuple((m["role"], m["content"]) for m in ex.messages())) for ex in v]
            for k, v in splits.items()}


def load_splits(data: str, validation: str | None, base_dir: Path | None, seed: int = 0,
                validation_size: int = 64) -> dict[str, list[Sample]]:
    """Train and validation samples (and test, for built-in tasks) from the recipe's data settings."""
    if data.startswith(BUILTIN_PREFIX):
        return builtin_splits(data[len(BUILTIN_PREFIX):], seed=seed)
    train = read_jsonl(resolve_path(data, base_dir))
    if validation:
        return {"train": train, "validation": read_jsonl(resolve_path(validation, base_dir))}
    if len(train) < 2:
        raise EdgepeftError(f"{data}: needs at least 2 examples to hold one out for validation")
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    n_val = max(1, min(validation_size, len(train) // 10))
    held = set(order[:n_val])
    return {"train": [s for i, s in enumerate(train) if i not in held],
            "validation": [s for i, s in enumerate(train) if i in held]}


def recipe_splits(recipe) -> dict[str, list[Sample]]:
    """The splits of a recipe's ``[train]`` data (``data``, ``validation_data``, ``seed``), relative paths read
    next to the recipe: the one way every stage and check gets them."""
    t = recipe.train
    return load_splits(t.data, t.validation_data, recipe.base_dir, seed=t.seed)


def _chat(tokenizer, messages, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in messages], tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


CHARS_PER_TOKEN_BOUND = 64  # no tokenizer's token spans more characters (text past it cannot reach max_length)


def _clip(text: str, max_length: int) -> str:
    """``text`` cut to what can matter for its first ``max_length`` tokens, before tokenizing: a 50 MB line
    would otherwise cost gigabytes of token offsets only to be truncated."""
    return text[:max_length * CHARS_PER_TOKEN_BOUND]


def encode(tokenizer, sample: Sample, max_length: int) -> tuple[list[int], list[int]]:
    """Token ids and labels (IGNORE where no loss is taken), truncated to ``max_length``."""
    if sample.text is not None:
        ids = tokenizer(_clip(sample.text, max_length), add_special_tokens=True)["input_ids"][:max_length]
        return ids, list(ids)
    if sample.prompt is not None:
        p = tokenizer(_clip(sample.prompt, max_length), add_special_tokens=True)["input_ids"]
        c = tokenizer(_clip(sample.completion, max_length), add_special_tokens=False)["input_ids"] + \
            [tokenizer.eos_token_id]
        ids = (p + c)[:max_length]
        return ids, ([IGNORE] * len(p) + c)[:max_length]
    if getattr(tokenizer, "chat_template", None) is None:
        raise EdgepeftError("data has 'messages' but the tokenizer has no chat template")
    sample = Sample(messages=tuple((r, _clip(c, max_length)) for r, c in sample.messages))
    full = _chat(tokenizer, sample.messages, add_generation_prompt=False)
    spans = []  # character spans of assistant turns, including their end-of-turn marker
    for i, (role, _) in enumerate(sample.messages):
        if role != "assistant":
            continue
        start = len(_chat(tokenizer, sample.messages[:i], add_generation_prompt=True))
        end = len(_chat(tokenizer, sample.messages[:i + 1], add_generation_prompt=False))
        spans.append((start, end))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"][:max_length]
    labels = [t if any(s <= a and b <= e and b > a for s, e in spans) else IGNORE
              for t, (a, b) in zip(ids, enc["offset_mapping"][:len(ids)], strict=True)]
    return ids, labels


def prompt_ids(tokenizer, sample: Sample) -> list[int] | None:
    """The ids a model answers from, for exact-match scoring; None for samples with no reference."""
    if sample.reference is None:
        return None
    if sample.prompt is not None:
        return tokenizer(sample.prompt, add_special_tokens=True)["input_ids"]
    return tokenizer(_chat(tokenizer, sample.messages[:-1], add_generation_prompt=True),
                     add_special_tokens=False)["input_ids"]


def collate(batch: list[tuple[list[int], list[int]]], pad_id: int):
    """Left-padded tensors: completions end at the right edge, so one ``logits_to_keep`` serves the batch."""
    import torch

    n = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for i, (ids, lab) in enumerate(batch):
        input_ids[i, n - len(ids):] = torch.tensor(ids)
        labels[i, n - len(lab):] = torch.tensor(lab)
        mask[i, n - len(ids):] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids, "labels": labels}


def pack(batch: list[tuple[list[int], list[int]]], multiple: int = 1, pad_id: int = 0):
    """The batch as one row without padding, its examples' common prompt prefix computed once.

    The row holds the prefix the examples share (the system prompt and chat markup, up to the first labelled
    token of any of them), then each example's remaining tokens one after another. A 4D additive mask lets each
    token attend to the shared prefix and to the earlier tokens of its own example only, and position ids
    restart after the prefix for each example, so every token sees exactly what it would see in its own padded
    row: the same loss, for the tokens actually present. ``targets`` holds at each position the token it
    predicts (IGNORE where none is learned, and at each example's last token); ``keep`` the positions whose
    logits are needed; ``segments`` the layout itself, (prefix length, [(start, end) of each example]), for
    attention that computes only what the mask allows (``edgepeft.models.packed``); ``tokens`` the row's own
    tokens.

    ``multiple`` > 1 rounds the row's length up with ``pad_id`` tokens, a segment of their own that predicts
    nothing: steps then repeat a few shapes instead of a new one each, and the CPU matmul libraries (oneDNN,
    ideep) reuse their compiled kernels instead of caching new ones step after step.
    """
    import torch

    first = [next((j for j, t in enumerate(lab) if t != IGNORE), len(lab)) for _, lab in batch]
    shared = min(len(ids) for ids, _ in batch)
    for ids, _ in batch[1:]:
        shared = next((j for j in range(shared) if ids[j] != batch[0][0][j]), shared)
    shared = max(0, min(shared, min(first) - 1))  # prefix positions predict no label: they are computed once
    ids = list(batch[0][0][:shared])
    positions = list(range(shared))
    targets = [IGNORE] * shared
    owner = [-1] * shared
    spans = []
    for i, (seq, lab) in enumerate(batch):
        spans.append((len(ids), len(ids) + len(seq) - shared))
        ids += seq[shared:]
        positions += range(shared, len(seq))
        targets += list(lab[shared + 1:]) + [IGNORE]
        owner += [i] * (len(seq) - shared)
    tokens = len(ids)
    extra = -tokens % multiple
    if extra:
        spans.append((tokens, tokens + extra))
        ids += [pad_id] * extra
        positions += range(shared, shared + extra)
        targets += [IGNORE] * extra
        owner += [len(batch)] * extra
    n = len(ids)
    who = torch.tensor(owner)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    allowed = causal & ((who[:, None] == who[None, :]) | (who[None, :] == -1))
    mask = torch.zeros(n, n).masked_fill_(~allowed, torch.finfo(torch.float32).min)
    t = torch.tensor(targets)
    return {"input_ids": torch.tensor([ids]), "position_ids": torch.tensor([positions]),
            "attention_mask": mask[None, None], "targets": t[None], "keep": (t != IGNORE).nonzero()[:, 0],
            "tokens": tokens, "segments": (shared, spans)}
