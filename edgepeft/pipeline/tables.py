"""The tables of a recipe, one typed dataclass each: every key a recipe may set, its default and its check.

A stage's config is the first table it names in its declaration (``[train]`` and ``[adapter]`` both feed
the train stage). ``[profile]`` is the latency profiler's settings (``edgepeft.latency.profile``) and
``[evaluate]`` the quality gate's budgets (``edgepeft.quality.gate``); both live with the code that reads
them and are listed here with the others.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from edgepeft.latency.profile import ProfileConfig
from edgepeft.models.sources import DEFAULT_MODEL
from edgepeft.quality.gate import EvaluateConfig


@dataclass
class ModelConfig:
    source: str = DEFAULT_MODEL
    # How chat data and the bundle's prompts are laid out: "own" (the tokenizer's chat template), "plain"
    # (edgepeft's: the system text, then "User: ..." and "Assistant: ..." lines; for base models, which have none)
    # or "auto" (own if the tokenizer has one, else plain)
    chat_template: Literal["auto", "own", "plain"] = "auto"

    def check(self) -> str | None:
        return None if self.source.strip() else "source must not be empty"


@dataclass
class QuantizeConfig:
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    # Layers whose weights stay in full precision (bitsandbytes' llm_int8_skip_modules); lm_head always does.
    skip_modules: list[str] | None = None


@dataclass
class AdapterConfig:
    # lora, ia3 (HF peft; merged into the weights), adapter (bottleneck adapters, edgepeft.adapters.bottleneck:
    # extra MatMuls in the exported graph) or prefix (prefix tuning, edgepeft.adapters.prefix: keys and values
    # ahead of the cache, in the graph) or prompt (prompt tuning, edgepeft.adapters.prompt: a soft prompt ahead of
    # the tokens, in the graph) or unipelt (UniPELT: gated LoRA on target_modules, default q and v, a gated
    # bottleneck adapter per `placement`, a gated prefix; every part behind its own per-token gate)
    method: Literal["lora", "ia3", "adapter", "prefix", "prompt", "unipelt"] = "lora"
    # LoRA
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    # Module names, or "all-linear" (LoRA only). Unset: LoRA takes every linear layer but the output head;
    # IA3 takes peft's default for the architecture (Llama family: k_proj, v_proj, down_proj).
    target_modules: list[str] | str | None = None
    # IA3 only: which targeted modules are feed-forward (their input, not output, is scaled).
    feedforward_modules: list[str] | None = None
    # A per-token sigmoid gate on each bottleneck adapter, or on each LoRA update (UniPELT's gates: gated LoRA
    # cannot be merged and stays a side branch of the graph; its target_modules default to q_proj and v_proj)
    gated: bool = False
    # Bottleneck adapters: width of the bottleneck (the reduction factor is hidden / bottleneck: 576 / 64 = 9 on
    # SmolLM2; a multiple of the target's block_size, since its up-projection is quantized block-wise), after
    # which sublayers, serial (on the sublayer's output) or parallel (on its input), each behind a per-token
    # sigmoid gate or not (`gated`), and a fixed scale on its output.
    bottleneck: int = 64
    placement: list[Literal["attn", "mlp"]] = field(default_factory=lambda: ["mlp"])
    mode: Literal["serial", "parallel"] = "serial"
    scale: float = 1.0
    # Prefix tuning: how many key/value positions each layer gets, and the width of the MLP that reparametrizes
    # them while training (0: train the keys and values directly). The bundle's context is shorter by the prefix.
    prefix_tokens: int = 16
    prefix_hidden: int = 512
    # Prompt tuning: how many virtual tokens (learned embeddings) go ahead of every sequence; the bundle's context
    # is shorter by them.
    prompt_tokens: int = 16

    def check(self) -> str | None:
        if self.method in ("lora", "unipelt") and (self.r <= 0 or self.alpha <= 0):
            return "r and alpha must be positive"
        if not 0 <= self.dropout < 1:
            return f"dropout must be in [0, 1) (got {self.dropout})"
        if self.method == "ia3" and self.target_modules == "all-linear":
            return "IA3 takes named target_modules (e.g. [\"k_proj\", \"v_proj\", \"down_proj\"]) or none"
        if self.feedforward_modules and self.method != "ia3":
            return "feedforward_modules applies to IA3 only"
        if self.gated and self.method in ("ia3", "prefix", "prompt"):
            return f"gated applies to LoRA and bottleneck adapters, not {self.method}"
        if self.method == "prefix":
            if self.target_modules is not None:
                return "target_modules applies to LoRA and IA3; a prefix goes ahead of every layer"
        if self.method in ("prefix", "unipelt") and (self.prefix_tokens <= 0 or self.prefix_hidden < 0):
            return "prefix_tokens must be positive and prefix_hidden not negative"
        if self.method == "prompt":
            if self.target_modules is not None:
                return "target_modules applies to LoRA and IA3; a soft prompt goes ahead of the tokens"
            if self.prompt_tokens <= 0:
                return "prompt_tokens must be positive"
        gated_lora = self.gated and self.method == "lora" or self.method == "unipelt"
        if gated_lora and isinstance(self.target_modules, list):
            from edgepeft.adapters.spec import LORA_TARGETS

            bad = [t for t in self.target_modules if t not in LORA_TARGETS]
            if bad:
                return f"gated LoRA targets the decoder's projections ({', '.join(LORA_TARGETS)}), not {bad[0]!r}"
        if self.method in ("adapter", "unipelt"):
            if self.target_modules is not None and self.method == "adapter":
                return "target_modules applies to LoRA and IA3; bottleneck adapters take placement"
            if self.bottleneck <= 0:
                return f"bottleneck must be positive (got {self.bottleneck})"
            if not self.placement or len(set(self.placement)) != len(self.placement):
                return "placement must name \"attn\" and/or \"mlp\", each once"
            if not (self.scale > 0 and self.scale < float("inf")):
                return f"scale must be positive and finite (got {self.scale})"
        return None


COMPUTE_DTYPES = ("auto", "float32", "bfloat16")


@dataclass
class TrainConfig:
    data: str = "builtin:phone-commands"  # or builtin:calendar-events (calib/data.py BUILTIN_TASKS), or a JSONL file
    validation_data: str | None = None
    steps: int = 100
    batch_size: int = 8
    lr: float | None = None  # unset: 1e-3 for LoRA, 1e-2 for IA3 (its few scaling vectors need larger steps)
    warmup_steps: int = 5
    weight_decay: float = 0.0
    max_length: int = 256
    seed: int = 0
    checkpoint_every: int = 25
    gradient_checkpointing: bool = False
    # Each step's examples in one row without padding, their shared prompt prefix computed once (LoRA and IA3;
    # the same loss as padded rows). false: left-padded rows.
    pack: bool = True
    # The dtype the 4-bit base's matmuls run in: "auto" is bfloat16 on a CUDA GPU that has it or a CPU with
    # AVX512-BF16/AMX instructions (the QLoRA recipe's compute dtype), float32 elsewhere (bf16 is emulated there).
    compute_dtype: str = "auto"
    eval_examples: int = 64  # validation examples scored by exact match (0: skip)
    eval_max_new_tokens: int = 48
    # Prose rehearsal: every step also takes `replay_batch` windows of `replay_tokens` tokens of prose, with a
    # next-token loss on every token, so that a pretrained base keeps its language while it learns a narrow task
    # (0: off). The windows come from the calibration part of `replay_text` (builtin:python-docs: the first 80%
    # of Python's help topics); the quality gate's held-out prose drops every line they contain.
    replay_text: str = "builtin:python-docs"
    replay_batch: int = 0
    replay_tokens: int = 128

    def check(self) -> str | None:
        if self.steps <= 0 or self.batch_size <= 0 or self.max_length <= 8:
            return "steps and batch_size must be positive, max_length > 8"
        if self.replay_batch < 0 or self.replay_tokens < 8:
            return "replay_batch must not be negative and replay_tokens at least 8"
        if self.lr is not None and not self.lr > 0:
            return "lr must be positive"
        if self.checkpoint_every <= 0:
            return "checkpoint_every must be positive"
        if self.compute_dtype not in COMPUTE_DTYPES:
            return f"compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}"
        return None


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


@dataclass
class ExportConfig:
    eval_windows: int = 4  # held-out prose windows for the prefill check (the merge stage's eval_text)
    eval_window_tokens: int = 128
    decode_check_tokens: int = 32  # tokens decoded one by one through the KV cache and checked
    max_logit_diff: float = 1e-3

    def check(self) -> str | None:
        if self.eval_windows <= 0 or self.eval_window_tokens <= 1 or self.decode_check_tokens < 0:
            return "eval_windows, eval_window_tokens must be positive and decode_check_tokens not negative"
        if self.decode_check_tokens >= self.eval_window_tokens:
            return "decode_check_tokens must be smaller than eval_window_tokens"
        return None


@dataclass
class RequantizeConfig:
    method: Literal["gptq", "clip", "rtn"] = "gptq"
    calib_text: str = "builtin:python-docs"  # prose to calibrate on (its calibration part, see calib/sets.py)
    calib_windows: int = 16  # windows of prose
    calib_task_windows: int = 8  # windows of the task's training examples
    calib_window_tokens: int = 256
    mixed_precision: bool = True  # promote the most sensitive MatMuls to int8 when int4 misses the budget
    # The search aims at this share of each [evaluate] budget on calibration data: held-out text scores
    # worse than calibration text, so a lower margin buys headroom for more bytes (docs/measurements.md).
    margin: float = 0.8
    measure_windows: int = 8  # calibration windows of prose, and of the task, each candidate is scored on
    sensitivity_windows: int = 4  # calibration windows each single-MatMul promotion is scored on
    gptq_damp: float = 0.01  # GPTQ's dampening of the Hessian, as a share of its mean diagonal
    # GPTQ rounds the inputs with the most energy first (block ranges then chosen up front): on Gemma 3 270M at
    # block 128, calibration KL 0.58 -> 0.52; off by default, so the SmolLM2 figures stay those measured
    gptq_act_order: bool = False
    # MatMuls kept at int8 whatever the search finds: each entry a part of their node names ("down_proj" keeps
    # every layer's down projection), as ORT's and Olive's nodes_to_exclude name them
    keep_int8: list[str] = field(default_factory=list)

    def check(self) -> str | None:
        if any(not isinstance(p, str) or not p for p in self.keep_int8):
            return "keep_int8 must be a list of non-empty strings (parts of MatMul node names)"
        if min(self.calib_windows, self.calib_window_tokens - 1, self.measure_windows,
               self.sensitivity_windows) <= 0 or self.calib_task_windows < 0:
            return "calib_windows, calib_window_tokens, measure_windows, sensitivity_windows must be positive"
        if not 0 < self.margin <= 1:
            return "margin must be in (0, 1]"
        if not 0 < self.gptq_damp < 1:
            return "gptq_damp must be in (0, 1)"
        return None


@dataclass
class HealConfig:
    """Stage ``heal``: fit the quantized graph's block scales (and RMSNorm weights) so that it reproduces the
    trained model, by distillation on calibration windows (the requantize stage's text and the task's
    training examples; never evaluation data). ``steps = 0`` ships the requantize stage's graph as it is.

    On by default: on the default recipe 96 steps (about 5 minutes on 2 cores) take the gate's held-out
    perplexity from +13.2% to +3.7% and KL from 0.138 to 0.114 against (4-bit base + adapter); 288 steps on
    256 windows reach KL 0.107 in three times as long, fewer than ~32 steps make it worse
    (docs/measurements.md)."""

    steps: int = 96  # optimizer steps, one calibration window each (0: off)
    lr: float = 1e-3  # Adam's step on the logarithm of each scale (a relative change); warmup, then cosine
    warmup_steps: int = 4
    norms: bool = True  # fit the RMSNorm weights too (at half the learning rate)
    prose_windows: int = 64  # calibration windows of prose (the calibration part of [requantize] calib_text)
    task_windows: int = 32  # windows of the task's training examples
    window_tokens: int = 256
    # Weight of the positions that predict a task window's answer tokens, against 1 for every other position: a
    # fit to every token of the task windows (mostly system prompt and question) lowered KL but cost the answers
    answer_weight: float = 1.0
    # Ship the fit only if no task loses more than this share of its answers (teacher-forced, in its calibration
    # windows, given exactly as the trained model gives them); unset: not checked, the shares are still reported.
    # On the calendar IA3 a fit that lowered KL cost 12.5 points of greedy exact match; the phone LoRA's fit gains
    # on the gate's test prompts while its answer tokens agree 0.2 points less on calibration windows, so the
    # check is per recipe until it is measured on every built-in one.
    max_answer_drop: float | None = None
    # [tasks] only: then each runtime adapter's own values (IA3 vectors, LoRA A and B) are fitted on the shipped
    # base, by KL to its (4-bit base + adapter), the base fixed, on its share of the prose windows and its task's
    # first adapter_examples training examples, each alone (as training and generation see them; packed task
    # windows put the teacher off its own distribution). The adapters were trained on the NF4 base; the int4 base
    # computes otherwise, and an adapter fitted on it wins back its task's answers for itself (calendar IA3 on
    # the gate's 512 test prompts, teacher-forced: 71.9% -> 76.4% of its teacher's 77.7%, docs/measurements.md).
    # One example or window per step. A fit that ends worse is not shipped: fewer of its examples answered as
    # their labels say, or its KL to the teacher on its prose windows up by more than adapter_max_kl_increase
    # (relative). The labels trade a little prose for the task: on multi.toml's base the fits took the examples'
    # answers 82.4% -> 88.7% (phone) and 68.0% -> 78.9% (calendar) at prose KL +6% and +5%. 0: off.
    adapter_steps: int = 256
    adapter_examples: int = 256
    adapter_max_kl_increase: float = 0.1
    adapter_lr: float | None = None  # unset: 3e-3 for IA3's vectors (~1), 3e-4 for LoRA's matrices
    # Beside the KL to its teacher, the adapter learns its training examples' own answer tokens (their labels) by
    # cross-entropy, with this weight (0: KL only): the task's answers on the base that ships, with margins its
    # rounding does not flip. On this machine's multi base, teacher-forced on the gate's 512 test prompts (teacher:
    # calendar 77.7%, phone 84.8%): trained calendar 71.9%, phone 83.2%; KL alone 76.4%, 83.8%; KL + labels (1)
    # 78.1%, 85.5%, prose KL still below the trained values' (docs/measurements.md). On the packed windows it
    # had pulled against a teacher that answered 14% of them.
    adapter_label_weight: float = 1.0
    # The methods whose adapters are fitted. On multi.toml's base the phone LoRA's fit traded a little of its
    # answers for prose (gate, 512 test prompts: exact match 83.0% trained vs 82.4% fitted, perplexity +12.7% vs
    # +4.9%, budget 8%) and the calendar IA3's fit won answers (62.5% -> 71.9% teacher-forced): both are fitted.
    adapter_methods: list[str] = field(default_factory=lambda: ["ia3", "lora"])
    seed: int = 0
    checkpoint_every: int = 24
    # The check of the written graph: ONNX Runtime with float activations vs the PyTorch mirror, largest
    # absolute logit difference on one calibration window.
    max_mirror_diff: float = 1e-3

    def check(self) -> str | None:
        if self.steps < 0 or self.lr <= 0 or self.warmup_steps < 0 or self.checkpoint_every <= 0:
            return "steps and warmup_steps must not be negative, lr and checkpoint_every must be positive"
        if self.prose_windows < 0 or self.task_windows < 0 or self.prose_windows + self.task_windows == 0:
            return "prose_windows and task_windows must not be negative, and not both zero"
        if self.window_tokens < 2 or self.max_mirror_diff <= 0:
            return "window_tokens must be at least 2 and max_mirror_diff positive"
        if self.adapter_steps < 0 or self.adapter_examples < 0 or self.adapter_max_kl_increase < 0 or (
                self.adapter_lr is not None and self.adapter_lr <= 0):
            return ("adapter_steps, adapter_examples and adapter_max_kl_increase must not be negative and adapter_lr "
                    "must be positive")
        if any(m not in ("ia3", "lora") for m in self.adapter_methods):
            return f"adapter_methods must name runtime adapter methods (ia3, lora), not {self.adapter_methods}"
        if self.adapter_label_weight < 0:
            return "adapter_label_weight must not be negative"
        if self.answer_weight < 1:
            return "answer_weight must be at least 1"
        if self.max_answer_drop is not None and not 0 <= self.max_answer_drop < 1:
            return "max_answer_drop must be in [0, 1)"
        return None


@dataclass
class BundleConfig:
    """The bundle's contents follow from the target (formats, threads); its latency settings are in
    ``[profile]`` and its quality budgets in ``[evaluate]``."""
    # The output head computes the last prompt position only during prefill (the generator reads no other row);
    # the quality gate still reads every position of the same graph by feeding `logits_positions`.
    prune_lm_head: bool = True


TABLES = {"model": ModelConfig, "quantize": QuantizeConfig, "adapter": AdapterConfig, "train": TrainConfig,
          "merge": MergeConfig, "export": ExportConfig, "requantize": RequantizeConfig, "heal": HealConfig,
          "bundle": BundleConfig,
          "profile": ProfileConfig, "evaluate": EvaluateConfig}
