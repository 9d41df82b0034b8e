"""resbm-ds: Residual Bottleneck Models (ResBM) for low-bandwidth pipeline parallelism on DeepSpeed.

Importing the package loads nothing heavy; `import resbm_ds.hf` registers ResBM with transformers'
Auto classes (hf/modeling.py), so that `AutoModelForCausalLM.from_pretrained` loads a ResBM export
without `trust_remote_code`.
"""
__version__ = "0.1.0"

import sys as _sys


class _NoMlflowForDeepSpeedAutotuner:
    """DeepSpeed's autotuner imports mlflow at import time when it is installed (resbm-ds[track]),
    only to log autotuning experiments, which resbm-ds never runs: 2 of the 5 s each rank spends in
    `import deepspeed`. This finder refuses that one import (the autotuner then sets has_mlflow =
    False); every other `import mlflow`, ours in tracking.py included, is untouched."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if name == "mlflow":
            frame = _sys._getframe(1)   # the import machinery's frames, then the importing module's
            while frame is not None and frame.f_globals.get("__name__", "").startswith(("importlib", "_frozen_importlib")):
                frame = frame.f_back
            if frame is not None and frame.f_globals.get("__name__") == "deepspeed.autotuning.autotuner":
                raise ModuleNotFoundError("mlflow is not imported for DeepSpeed's autotuner", name="mlflow")
        return None


_sys.meta_path.insert(0, _NoMlflowForDeepSpeedAutotuner)
