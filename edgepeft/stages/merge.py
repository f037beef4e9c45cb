"""Stage ``merge``: fold the adapter into the dequantized 4-bit base and save a plain HF folder.

The adapter was trained against the NF4 weights, so it is merged into exactly those weights, dequantized
(merging into the original fp32 weights instead loses much of the fine-tune: the adapter learned to
correct the 4-bit rounding). The dequantized weights are loaded into a fresh, ordinary model built from
the same config: it is not flagged 4-bit, so peft merges LoRA and IA3 alike (peft refuses to merge IA3
into a model flagged ``is_loaded_in_4bit``, even after ``dequantize()``).

The stage then checks its own work: on held-out prose (and the task's validation prompts) it compares the
merged model with the reference the user trained, (4-bit base + adapter), and fails if the largest logit
difference is above ``max_logit_diff``.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgepeft.errors import EdgepeftError
from edgepeft.pipeline import StageContext


@dataclass
class MergeConfig:
    eval_text: str = "builtin:python-docs"  # held-out prose: builtin:python-docs or a text file
    eval_windows: int = 4
    eval_window_tokens: int = 128
    max_logit_diff: float = 1e-2

    def check(self) -> str | None:
        if self.eval_windows <= 0 or self.eval_window_tokens <= 1:
            return "eval_windows and eval_window_tokens must be positive"
        return None


def eval_text(spec: str, base_dir) -> str:
    if spec == "builtin:python-docs":
        from edgepeft.calib.text import python_docs

        return python_docs("evaluation")
    from edgepeft.data import resolve_path

    path = resolve_path(spec, base_dir)
    if not path.is_file():
        raise EdgepeftError(f"[merge] eval_text: file not found: {spec}")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise EdgepeftError(f"[merge] eval_text: {spec} is empty")
    return text


def heldout_windows(recipe, tokenizer, windows: int, length: int, stage: str) -> list[list[int]]:
    """Token windows of the recipe's held-out text (``[merge] eval_text``), shared by the checking stages."""
    from edgepeft.calib.text import token_windows

    found = token_windows(tokenizer, eval_text(recipe.merge.eval_text, recipe.base_dir), windows, length)
    if not found:
        raise EdgepeftError(f"[{stage}] eval_text {recipe.merge.eval_text!r} is shorter than one window of "
                            f"{length} tokens")
    return found


def dequantized_model(qdir):
    """A plain fp32 model holding the exact dequantized 4-bit weights of the quantize stage's output."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from edgepeft.runtime import load_4bit

    q = load_4bit(qdir, torch.device("cpu"))
    q.dequantize()
    state = {k: v.detach().to(torch.float32) for k, v in q.state_dict().items()}
    config = AutoConfig.from_pretrained(qdir)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"dequantized weights do not fit the model: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    if config.tie_word_embeddings:
        plain.tie_weights()
    return plain.eval()


def run(ctx: StageContext) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    from edgepeft.data import load_splits, prompt_ids
    from edgepeft.metrics import compare_logits
    from edgepeft.runtime import load_4bit

    cfg: MergeConfig = ctx.config
    qdir = ctx.input("quantize") / "model"
    adir = ctx.input("train") / "adapter"
    tokenizer = AutoTokenizer.from_pretrained(adir)
    with torch.no_grad():
        merged = PeftModel.from_pretrained(dequantized_model(qdir), adir).merge_and_unload()
    merged.save_pretrained(ctx.out / "model", safe_serialization=True)
    tokenizer.save_pretrained(ctx.out / "model")

    reference = PeftModel.from_pretrained(load_4bit(qdir, torch.device("cpu")), adir)
    windows = heldout_windows(ctx.recipe, tokenizer, cfg.eval_windows, cfg.eval_window_tokens, "merge")
    prose = compare_logits(reference, merged, windows)
    train_cfg = ctx.recipe.train
    val = load_splits(train_cfg.data, train_cfg.validation_data, ctx.recipe.base_dir, seed=train_cfg.seed)["validation"]
    prompts = [p for p in (prompt_ids(tokenizer, s) for s in val[:8]) if p]
    task = compare_logits(reference, merged, prompts) if prompts else None
    worst = max(prose["max_logit_diff"], task["max_logit_diff"] if task else 0.0)
    ctx.figures.update(reference="4-bit base + adapter", held_out_text=cfg.eval_text, prose=prose, task_prompts=task,
                       max_logit_diff=worst, max_logit_diff_allowed=cfg.max_logit_diff)
    print(f"  merged vs (4-bit base + adapter): max |logit diff| {worst:.2e} (allowed {cfg.max_logit_diff:g}); "
          f"next-token agreement {100 * prose['next_token_agreement']:.2f}% on {prose['tokens']} held-out tokens")
    if not worst <= cfg.max_logit_diff:
        raise EdgepeftError(f"[merge] merged model differs from (4-bit base + adapter) by {worst:.3g} in logits, "
                            f"more than max_logit_diff = {cfg.max_logit_diff:g}")
