"""Calibration and evaluation sets, and the rule that keeps them apart.

Calibration (what ``requantize`` fits its scales and chooses its precision on):
  * prose: the calibration part of a text, by default ``builtin:python-docs`` (the first 80% of Python's
    help topics, see ``calib/text.py``), cut into token windows;
  * the task: training examples of the recipe's data, rendered as the model sees them in training (chat
    template and answer), packed into windows. The model was fitted to them already, so calibrating on
    them reveals nothing new; they make the scales care about the task's own activations.

Evaluation (what ``evaluate`` scores the bundle on):
  * prose: the evaluation part of the held-out text (the last 20% of the help topics), every line of which
    that also occurs in the calibration text or the training data is removed first (``disjoint_text``);
  * the task: its test split (built-in tasks; their splits are disjoint by construction) or validation
    examples, minus any whose prompt also occurs in the training data (``disjoint_samples``).

So evaluation never sees a line or a prompt that calibration or training saw, even when a user points both
at the same file: the overlap is dropped and counted, and an evaluation left empty is an error.
"""

from __future__ import annotations

import itertools

from edgepeft.calib.data import IGNORE, encode, read_jsonl, recipe_splits, resolve_path
from edgepeft.calib.text import python_docs, token_windows

from edgepeft.core.errors import EdgepeftError

BUILTIN_TEXT = "builtin:python-docs"
MIN_LINE = 20  # shorter lines ("Example:", "}") recur in any text; they are not evidence of overlap


def text_part(spec: str, part: str, base_dir=None) -> str:
    """The ``part`` ("calibration" or "evaluation") of a text: the built-in split of Python's help topics, or a
    user's text file or JSONL (edgepeft's data shapes) taken whole (its separation from the other part is then
    enforced by ``disjoint_text``)."""
    if spec == BUILTIN_TEXT:
        return python_docs(part)
    path = resolve_path(spec, base_dir)
    if not path.is_file():
        raise EdgepeftError(f"{part} text not found: {spec}")
    if path.suffix == ".jsonl":  # the data shapes of edgepeft.calib.data: each example's text, one after another
        return "\n\n".join(sample_text(s) for s in read_jsonl(path))
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise EdgepeftError(f"{part} text {spec} is empty")
    return text


def _key(line: str) -> str:
    return " ".join(line.split()).lower()


def line_keys(texts) -> set[str]:
    return {_key(ln) for t in texts for ln in t.splitlines() if len(_key(ln)) >= MIN_LINE}


def disjoint_text(text: str, seen: set[str]) -> tuple[str, int]:
    """``text`` without the lines whose normalized form is in ``seen``; and how many were dropped."""
    kept, dropped = [], 0
    for ln in text.splitlines():
        if len(_key(ln)) >= MIN_LINE and _key(ln) in seen:
            dropped += 1
        else:
            kept.append(ln)
    return "\n".join(kept), dropped


def sample_text(sample) -> str:
    """Everything a training sample shows the model, as text (for overlap checks)."""
    if sample.messages:
        return "\n".join(c for _, c in sample.messages)
    if sample.prompt is not None:
        return f"{sample.prompt}\n{sample.completion}"
    return sample.text or ""


def prompt_key(sample) -> str:
    if sample.messages:
        return _key("\n".join(c for r, c in sample.messages if r == "user"))
    return _key(sample.prompt if sample.prompt is not None else sample.text or "")


def disjoint_samples(samples, train) -> tuple[list, int]:
    """The evaluation samples whose prompt no training sample has; and how many were dropped."""
    seen = {prompt_key(s) for s in train}
    kept = [s for s in samples if prompt_key(s) not in seen]
    return kept, len(samples) - len(kept)


def task_windows(tokenizer, samples, windows: int, length: int, answers: list | None = None) -> list[list[int]]:
    """Training samples encoded as in training, concatenated and cut into ``windows`` windows of ``length``.
    ``answers``, when given, receives one mask per window: 1 at the positions that predict an answer token (the
    positions training takes its loss from), 0 elsewhere."""
    ids: list[int] = []
    mask: list[int] = []
    for s in samples:
        if len(ids) >= windows * length:
            break
        x, labels = encode(tokenizer, s, length)
        ids += x
        mask += [int(lab != IGNORE) for lab in labels]
    count = min(windows, len(ids) // length)
    if answers is not None:  # position t predicts token t + 1: the mask is the labels' shifted one to the left
        answers += [mask[i * length + 1:(i + 1) * length + 1] + [0] * (i * length + length + 1 > len(mask))
                    for i in range(count)]
    return [ids[i * length:(i + 1) * length] for i in range(count)]


def task_examples(tokenizer, samples, count: int, length: int, answers: list | None = None) -> list[list[int]]:
    """The first ``count`` training samples that have an answer, each alone, encoded as in training (one
    conversation from its start, truncated to ``length``): the context a model answers in at run time, where
    ``task_windows`` reads later conversations after earlier ones. ``answers``, when given, receives one mask per
    example as ``task_windows`` gives it, less the positions after the end-of-turn token (trained, never
    generated): teacher-forced, a model gives an answer exactly where greedy generation would."""
    out: list[list[int]] = []
    for s in samples:
        if len(out) >= count:
            break
        ids, labels = encode(tokenizer, s, length)
        mask = [int(lab != IGNORE and ids[t] != tokenizer.eos_token_id) for t, lab in enumerate(labels[1:])] + [0]
        if len(ids) > 1 and any(mask):
            out.append(ids)
            if answers is not None:
                answers.append(mask)
    return out


def calibration_windows(recipe, tokenizer, prose_windows: int, task_windows_: int, length: int,
                        text: str = BUILTIN_TEXT, answers: list | None = None) -> tuple[list[list[int]], dict]:
    """The calibration windows of a recipe: prose, then the task's training examples (with ``[tasks]``, every
    task's in turn: the shared base serves them all); plus a description. ``answers``, when given, receives
    each window's answer mask (``task_windows``; None for prose)."""
    prose = token_windows(tokenizer, text_part(text, "calibration", recipe.base_dir), prose_windows, length,
                          spread=True)
    if recipe.tasks.names:
        per_task = [recipe_splits(recipe.task(name))["train"] for name in recipe.tasks.names]
        train = [s for group in itertools.zip_longest(*per_task) for s in group if s is not None]
    else:
        train = recipe_splits(recipe)["train"]
    masks: list = []
    task = task_windows(tokenizer, train, task_windows_, length, masks) if task_windows_ else []
    if answers is not None:
        answers += [None] * len(prose) + masks
    return prose + task, {"text": text, "prose_windows": len(prose), "task_windows": len(task),
                          "window_tokens": length}


def adapter_windows(recipe, tokenizer, prose_windows: int, task_windows_: int, length: int,
                    text: str = BUILTIN_TEXT, answers: list | None = None
                    ) -> tuple[list[list[int]], list[str | None], dict]:
    """The calibration windows of a recipe with ``[tasks]``, each with the runtime adapter it is computed under
    (None: the base alone): the prose windows dealt in turn to the base and every task's adapter, then each
    task's own training examples under its adapter (``task_windows`` shared out among the tasks); plus a
    description. ``answers`` as in ``calibration_windows``."""
    names = recipe.tasks.names
    prose = token_windows(tokenizer, text_part(text, "calibration", recipe.base_dir), prose_windows, length,
                          spread=True)
    turn = [None, *names]
    windows, under = list(prose), [turn[i % len(turn)] for i in range(len(prose))]
    masks: list = [None] * len(prose)
    per_task = {}
    for k, name in enumerate(names):
        share = task_windows_ // len(names) + (k < task_windows_ % len(names))
        found = task_windows(tokenizer, recipe_splits(recipe.task(name))["train"], share, length,
                             masks) if share else []
        windows += found
        under += [name] * len(found)
        per_task[name] = len(found)
    if answers is not None:
        answers += masks
    return windows, under, {"text": text, "prose_windows": len(prose), "task_windows": sum(per_task.values()),
                            "task_windows_per_adapter": per_task, "window_tokens": length,
                            "prose_windows_per_adapter": {n or "(base)": under[:len(prose)].count(n) for n in turn}}


def replay_windows(recipe, tokenizer, count: int, length: int) -> list[list[int]]:
    """Up to ``count`` windows of ``length`` tokens of the recipe's rehearsal prose (``[train] replay_text``, its
    calibration part), spread over all of it."""
    spec = recipe.train.replay_text
    found = token_windows(tokenizer, text_part(spec, "calibration", recipe.base_dir), count, length, spread=True)
    if not found:
        raise EdgepeftError(f"[train] replay_text {spec!r} is shorter than one window of {length} tokens")
    return found


def evaluation_text(recipe, text: str, calib_text: str) -> tuple[str, dict]:
    """The held-out prose for evaluation, with every line seen in calibration or training (its examples and
    its rehearsal prose) removed."""
    train = recipe_splits(recipe)["train"]
    seen_texts = [text_part(calib_text, "calibration", recipe.base_dir)] + [sample_text(s) for s in train]
    if recipe.train.replay_batch:
        seen_texts.append(text_part(recipe.train.replay_text, "calibration", recipe.base_dir))
    seen = line_keys(seen_texts)
    held, dropped = disjoint_text(text_part(text, "evaluation", recipe.base_dir), seen)
    return held, {"text": text, "lines_dropped_as_seen_in_calibration_or_training": dropped}


def check_text(spec: str, base_dir) -> str:
    """The held-out prose the merge and export stages check their output on (``[merge] eval_text``): the
    evaluation part of the built-in text, or a user's text file whole."""
    if spec == BUILTIN_TEXT:
        return python_docs("evaluation")
    path = resolve_path(spec, base_dir)
    if not path.is_file():
        raise EdgepeftError(f"[merge] eval_text: file not found: {spec}")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise EdgepeftError(f"[merge] eval_text: {spec} is empty")
    return text


def check_windows(recipe, tokenizer, windows: int, length: int, stage: str) -> list[list[int]]:
    """Token windows of the recipe's ``[merge] eval_text``, shared by the stages that check their own output."""
    found = token_windows(tokenizer, check_text(recipe.merge.eval_text, recipe.base_dir), windows, length)
    if not found:
        raise EdgepeftError(f"[{stage}] eval_text {recipe.merge.eval_text!r} is shorter than one window of "
                            f"{length} tokens")
    return found
