"""The model and its rollouts: flow-matching schedule, the block-causal Wan DiT and its KV cache, the velocity
field, block-first / hierarchical (Alg. 1) / pipelined rollouts, the teacher's sampler, generation. Plain PyTorch.
"""
