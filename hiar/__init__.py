"""HiAR: hierarchical autoregressive denoising for long-video diffusion distillation (plain PyTorch).

This package never imports Ray, MLflow or boto3: the math does not know where it runs.
"""

__version__ = "0.1.0"
