"""Training methods, each a step over a batch: flow-matching and DMD/FKL losses, ODE-regression init and
HiAR distillation, tiny-teacher pretraining, teacher samples for the datasets, FSDP2 sharding. Plain PyTorch.
"""
