"""run_dir.config_changes: what a resume (and the convergence suite's reuse of finished runs) counts
as a changed setting."""
from resbm_ds.config import load_config
from resbm_ds.run_dir import config_changes


def test_a_key_the_saved_config_lacks_counts_as_its_default():
    new = load_config("cpu-demo").to_dict()
    saved = load_config("cpu-demo").to_dict()
    del saved["bottleneck"]["token_ids"]          # written before the key existed
    assert config_changes(saved, new) == {}
    changed = load_config("cpu-demo", ["bottleneck.token_ids=sent"]).to_dict()
    assert config_changes(saved, changed) == {"bottleneck.token_ids": ("local", "sent")}


def test_a_saved_auto_switch_is_a_change_once_auto_means_something_else():
    """A config is saved with its `auto` switches resolved; one saved as `auto` (before they were
    resolved, when auto meant a learned table) no longer matches: a resume says so instead of
    building a different side channel."""
    new = load_config("cpu-demo").to_dict()
    assert (new["bottleneck"]["token_channel"], new["bottleneck"]["token_ids"]) == ("hashed", "local")
    old = load_config("cpu-demo").to_dict()
    old["bottleneck"].update(token_channel="auto", token_ids="sent")
    assert config_changes(old, new) == {"bottleneck.token_channel": ("auto", "hashed"),
                                        "bottleneck.token_ids": ("sent", "local")}


def test_changed_values_are_reported_within_only_and_outside_allowed():
    a = load_config("cpu-demo").to_dict()
    b = load_config("cpu-demo", ["train.lr=0.01", "seed=7"]).to_dict()
    assert config_changes(a, b) == {"train.lr": (a["train"]["lr"], 0.01), "seed": (a["seed"], 7)}
    assert config_changes(a, b, only="train.") == {"train.lr": (a["train"]["lr"], 0.01)}
    assert config_changes(a, b, allowed=("train.",)) == {"seed": (a["seed"], 7)}
