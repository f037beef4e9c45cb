"""Healing: after re-quantization, fit the continuous parameters the int4 graph reads (every MatMulNBits
block scale, the head's and with it the shared token table's, and the RMSNorm weights) so that the graph
reproduces the model the user trained, while the integer codes GPTQ chose stay as they are. The bundle's
format, size and speed do not change.

``mirror`` is a PyTorch model that computes what the graph's kernels compute (fixed codes, trainable
scales, the target's int8 rounding of activations with a straight-through gradient) and writes its fitted
values back into the graph; ``distill`` is the loop that fits it by minimizing the KL divergence from the
trained model's next-token distribution. The stage that runs them is ``edgepeft.stages.heal``.
"""
