"""resbm-ds: Residual Bottleneck Models (ResBM) for low-bandwidth pipeline parallelism on DeepSpeed."""
__version__ = "0.1.0"
