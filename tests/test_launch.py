"""The launch plan (resbm_ds/launch.py): what the engine starts from."""
import dataclasses

import pytest

from resbm_ds.config import load_config
from resbm_ds.engine import build_engine
from resbm_ds.launch import LaunchPlan, check_config


def test_build_engine_takes_a_launch_plan_and_the_plan_is_frozen():
    """The engine starts only from what passed every pre-launch check (launch.py), never a bare config."""
    cfg = load_config("cpu-demo", ["pipeline.stages=1"])
    with pytest.raises(TypeError, match="LaunchPlan"):
        build_engine(cfg)
    plan = check_config(cfg, 1)
    assert isinstance(plan, LaunchPlan) and plan.dp_size == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.world_size = 2
