"""The checkpoint store (resbm_ds/checkpoints/store.py) on real files: the tag rule, `latest`,
manifests, pruning and which tag a path names. Fast: no process group."""
import json

import pytest

from resbm_ds.checkpoints import store


def make_tag(ckpt, step, files=("layer_00-model_00-model_states.pt",), manifest=True):
    d = ckpt / store.tag_for(step)
    d.mkdir(parents=True)
    for name in files:
        (d / name).write_bytes(f"{name} at {step}".encode())
    if manifest:
        store.write_manifest(d)
    return d.name


def test_the_tag_rule_round_trips_and_orders_by_step(tmp_path):
    for step in (10, 2, 100):
        make_tag(tmp_path, step)
    (tmp_path / "notatag").mkdir()
    assert store.sibling_tags(tmp_path) == ["step2", "step10", "step100"]   # by step, not by name
    assert store.step_of(store.tag_for(37)) == 37
    with pytest.raises(ValueError):
        store.step_of("latest")


def test_publish_writes_the_manifest_then_latest_then_prunes(tmp_path):
    for step in (1, 2, 3):
        tag = make_tag(tmp_path, step, manifest=False)
        store.publish(tmp_path, tag, keep_last=2)
        assert store.read_latest(tmp_path) == tag
        assert json.loads((tmp_path / tag / store.MANIFEST).read_text())["format"] == 1
    assert store.sibling_tags(tmp_path) == ["step2", "step3"]
    assert not (tmp_path / "latest.tmp").exists()


def test_prune_never_removes_the_tag_latest_names(tmp_path):
    for step in (1, 2, 3):
        make_tag(tmp_path, step)
    store.point_latest(tmp_path, "step1")          # e.g. --resume-from step1 started a new branch
    assert store.prune(tmp_path, keep_last=1) == ["step2"]
    assert store.sibling_tags(tmp_path) == ["step1", "step3"]
    assert store.prune(tmp_path, keep_last=0) == []


def test_discard_removes_a_cut_short_save(tmp_path):
    tag = make_tag(tmp_path, 5, manifest=False)
    (tmp_path / "latest.tmp").write_text(tag)
    store.discard(tmp_path, tag)
    assert store.sibling_tags(tmp_path) == [] and not (tmp_path / "latest.tmp").exists()


def test_a_modified_file_is_refused_naming_it_and_the_previous_good_tag(tmp_path):
    make_tag(tmp_path, 1)
    bad = make_tag(tmp_path, 2)
    f = tmp_path / bad / "layer_00-model_00-model_states.pt"
    f.write_bytes(b"X" * len(f.read_bytes()))      # same size, other bytes
    with pytest.raises(store.IncompleteCheckpoint, match=r"step2 .*sha256 changed.*--resume-from step1"):
        store.verify(tmp_path / bad)
    assert store.newest_complete(tmp_path) == "step1"


def test_a_tag_is_a_directory_name_never_a_path(tmp_path):
    make_tag(tmp_path, 1)
    for tag in ("../step1", "/etc", "..", ""):
        with pytest.raises(store.TagError, match="not a path"):
            store.tag_dir(tmp_path, tag)


def test_checkpoint_dir_follows_latest_from_a_run_directory(tmp_path):
    ckpt = tmp_path / "checkpoints"
    make_tag(ckpt, 1)
    make_tag(ckpt, 2)
    store.point_latest(ckpt, "step1")
    assert store.checkpoint_dir(tmp_path) == ckpt / "step1"
    assert store.checkpoint_dir(tmp_path, "step2") == ckpt / "step2"
    store.point_latest(ckpt, "step9")
    with pytest.raises(FileNotFoundError, match=r"names 'step9', which is missing.*\['step1', 'step2'\]"):
        store.checkpoint_dir(tmp_path)
