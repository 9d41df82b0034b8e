"""The compatibility room (resbm_ds/compat.py): every DeepSpeed or torch internal it patches or reads
still exists on the installed packages, with the parameters and source it was written against.

After a DeepSpeed or torch upgrade this is the test that fails, one line per internal that moved,
instead of a training run going wrong. Fast: it imports and inspects, and runs nothing distributed.
"""
import ast
import inspect
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from resbm_ds import compat

COMPAT_SOURCE = Path(compat.__file__).read_text()
# resolving the patch points imports DeepSpeed modules that use torch.jit.script_method
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


@pytest.mark.parametrize("point", compat.PATCH_POINTS,
                         ids=[f"{p.attr}{'~' + p.mentions if p.mentions else ''}" for p in compat.PATCH_POINTS])
def test_every_patched_internal_still_fits(point):
    assert compat.check(point) is None, compat.check(point)


def test_the_installed_deepspeed_is_a_tested_one():
    assert compat.deepspeed_version_problem() is None


def test_an_untested_deepspeed_is_named(monkeypatch):
    import deepspeed
    monkeypatch.setattr(deepspeed, "__version__", "0.20.0")
    assert "installed: 0.20.0" in compat.deepspeed_version_problem()
    with pytest.raises(RuntimeError, match="bottleneck.token_ids=local reads .* installed: 0.20.0"):
        compat.require_tested_deepspeed("bottleneck.token_ids=local")


def test_the_check_sees_what_it_checks():
    """A moved attribute, a changed signature and a rewritten body each fail the check."""
    P = compat.PatchPoint
    assert "is gone" in compat.check(P("deepspeed.runtime.pipe.p2p", "send_renamed", used_by="x"))
    assert "is gone" in compat.check(P("deepspeed.runtime.pipe.p2p_renamed", "send", used_by="x"))
    assert "takes ('tensor', 'dest_stage', 'async_op')" in compat.check(
        P("deepspeed.runtime.pipe.p2p", "send", ("tensor", "dest_stage"), used_by="x"))
    assert "no longer contains" in compat.check(
        P("deepspeed.runtime.pipe.p2p", "send", mentions="something DeepSpeed never wrote", used_by="x"))
    # deepspeed.comm's timed_op wrapper takes (*args, **kwargs): the check reads the real function
    import deepspeed.comm as ds_comm
    assert tuple(inspect.signature(ds_comm.all_reduce).parameters) == ("args", "kwargs")
    assert tuple(inspect.signature(compat.signature_target(ds_comm.all_reduce)).parameters)[:3] == \
        ("tensor", "op", "group")


def defined_functions() -> set[str]:
    return {n.name for n in ast.parse(COMPAT_SOURCE).body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}


HELPERS = {"deepspeed_version_problem", "require_tested_deepspeed", "PatchPoint", "resolve",
           "signature_target", "check", "restore_comm"}


def test_every_patch_has_patch_points():
    """A patch added to compat.py without the internals it touches in PATCH_POINTS fails here."""
    used = " ".join(p.used_by for p in compat.PATCH_POINTS)
    missing = sorted(n for n in defined_functions() - HELPERS if n not in used)
    assert not missing, f"add PatchPoints (used_by=...) for: {missing}"


def test_every_attribute_compat_assigns_is_listed():
    """PATCHED_ATTRIBUTES (which tests/test_layout.py forbids elsewhere) holds every attribute name
    compat.py assigns and every private one it reads, so the two tests cover the same ground."""
    assigned, private = set(), set()
    for node in ast.walk(ast.parse(COMPAT_SOURCE)):
        targets = (node.targets if isinstance(node, (ast.Assign, ast.Delete)) else
                   [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else [])
        for t in targets:
            for e in (t.elts if isinstance(t, ast.Tuple) else [t]):
                if isinstance(e, ast.Attribute):
                    assigned.add(e.attr)
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            private.add(node.attr)
        if isinstance(node, ast.FunctionDef) and node.name.startswith("_") and not node.name.startswith("__"):
            private.add(node.name)
    assert assigned <= compat.PATCHED_ATTRIBUTES, sorted(assigned - compat.PATCHED_ATTRIBUTES)
    assert private <= compat.PRIVATE_ATTRIBUTES, sorted(private - compat.PRIVATE_ATTRIBUTES)


# ---- the small patches, on stand-ins -----------------------------------------------------------------
def test_patch_comm_replaces_and_restores_the_transport():
    from deepspeed.runtime.pipe import p2p
    import deepspeed.comm as ds_comm
    before = (p2p.send, p2p.recv, ds_comm.all_reduce, ds_comm.broadcast)
    mine = tuple(lambda *a, **k: None for _ in range(4))
    originals = compat.patch_comm(*mine)
    try:
        assert originals == before
        assert (p2p.send, p2p.recv, ds_comm.all_reduce, ds_comm.broadcast) == mine
    finally:
        compat.restore_comm(originals)
    assert (p2p.send, p2p.recv, ds_comm.all_reduce, ds_comm.broadcast) == before


def test_grid_reads(monkeypatch):
    from deepspeed.runtime.pipe import p2p
    monkeypatch.setattr(p2p, "_grid", None, raising=False)
    assert compat.stages_of_ranks([0, 1]) is None
    topo = SimpleNamespace(get_coord=lambda r: SimpleNamespace(pipe=r // 2))
    monkeypatch.setattr(p2p, "_grid", SimpleNamespace(get_stage_id=lambda: 1, _topo=topo,
                                                      stage_to_global=lambda stage_id: 10 + stage_id))
    assert compat.own_stage() == 1 and compat.stage_to_global(0) == 10
    assert compat.stages_of_ranks([0, 1]) == {0} and compat.stages_of_ranks([1, 2]) == {0, 1}


def test_parameter_tags():
    a, b, tied = (nn.Parameter(torch.zeros(1)) for _ in range(3))
    tied.ds_pipe_replicated = True
    compat.tag_model_parallel([a, b, tied])
    assert (a.model_parallel, b.model_parallel, tied.model_parallel) == (True, True, False)
    compat.tag_use_muon([a, b], {id(b)})
    assert (a.use_muon, b.use_muon) == (False, True)


def test_set_last_lr():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    opt.param_groups[0]["lr"] = 0.25
    compat.set_last_lr(sched)
    assert sched.get_last_lr() == [0.25]


def test_shm_allreduce_off(monkeypatch):
    monkeypatch.setenv("LOCAL_SIZE", "2")
    with compat.shm_allreduce_off("gloo"):
        assert "LOCAL_SIZE" not in os.environ
    assert os.environ["LOCAL_SIZE"] == "2"
    with compat.shm_allreduce_off("nccl"):
        assert os.environ["LOCAL_SIZE"] == "2"


def test_take_or_skip_step():
    calls = []

    def step(*a, **k):
        calls.append(opt.overflow)
        return "stepped"

    opt = SimpleNamespace(overflow=None)                               # ZeRO-0
    assert compat.take_or_skip_step(opt, step, False, False) == "stepped" and opt.overflow is False
    assert compat.take_or_skip_step(opt, step, True, False) is None and opt.overflow is True
    assert calls == [False]

    class Zero1:
        overflow, check_grad_overflow = False, False

        def step(self):
            if self.check_grad_overflow:
                self.check_overflow()
            return self.overflow

    z = Zero1()
    assert compat.take_or_skip_step(z, z.step, True, True) is True    # it found the overflow
    assert not z.check_grad_overflow and "check_overflow" not in vars(z)
    z.overflow = False
    assert compat.take_or_skip_step(z, z.step, False, True) is False


def test_replace_optimizer_step_and_checkpoint_load():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    engine = SimpleNamespace(optimizer=opt, checkpoint_engine=SimpleNamespace(load=None))
    own = opt.step
    assert compat.replace_optimizer_step(engine, print) == own and opt.step is print
    compat.replace_checkpoint_load(engine, print)
    assert engine.checkpoint_engine.load is print


def test_keep_fp32_clip_norm_only_where_deepspeed_drops_it(monkeypatch):
    def engine(bf16=False, zero=0, clip=1.0):
        return SimpleNamespace(bfloat16_enabled=lambda: bf16, zero_optimization=lambda: zero,
                               gradient_clipping=lambda: clip, clip_fp32_gradients="deepspeed's",
                               module=nn.Linear(2, 2), mpu=None)
    for kept in (engine(bf16=True), engine(zero=1), engine(clip=0.0)):
        compat.keep_fp32_clip_norm(kept)
        assert kept.clip_fp32_gradients == "deepspeed's"
    clipped = []   # DeepSpeed's clip_grad_norm_ needs a process group: a stand-in that records its call

    def clip_grad_norm_(parameters, max_norm, mpu):
        clipped.append((list(parameters), max_norm, mpu))
        return torch.tensor(2.5)

    monkeypatch.setattr(compat, "clip_grad_norm_", clip_grad_norm_)
    e = engine()
    compat.keep_fp32_clip_norm(e)
    e.clip_fp32_gradients()
    assert e._global_grad_norm == 2.5 and isinstance(e._global_grad_norm, float)
    assert clipped == [(list(e.module.parameters()), 1.0, None)]
