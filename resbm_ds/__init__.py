"""resbm-ds: Residual Bottleneck Models (ResBM) for low-bandwidth pipeline parallelism on DeepSpeed.

Importing the package loads nothing heavy; `import resbm_ds.hf` registers ResBM with transformers'
Auto classes (hf/modeling.py), so that `AutoModelForCausalLM.from_pretrained` loads a ResBM export
without `trust_remote_code`.
"""
__version__ = "0.1.0"
