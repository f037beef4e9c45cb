"""Constants of edgepeft's own adapters that the recipe checks read without importing PyTorch."""

# the decoder projections gated LoRA can target (their places in the exported graph are known)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANK_QUANTUM = 32  # gated LoRA's rank is padded to a multiple of this in the graph (int4 block sizes divide it)


def padded_rank(r: int) -> int:
    return -(-r // RANK_QUANTUM) * RANK_QUANTUM
