"""Every bad input of issue #16 gets one line on stderr, `error: ...` naming the key or file, and exit
status 2, before any process group starts.

Most rows run in-process through the same `cli`-wrapped `main` the command line runs (train with
--dry-run, which runs every pre-launch check and then stops: a check that misses shows as exit 0);
a few rows run as real `python -m resbm_ds.train` / `deepspeed` processes to prove the CLI path.
The resume rows share one run directory holding a saved config.yaml, layout.json and a tag.
"""
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, free_port
from resbm_ds import train
from resbm_ds.config import load_config
from resbm_ds.hf import __main__ as hf_cli
from resbm_ds.checkpoints.store import write_manifest

pytestmark = pytest.mark.slow   # real launches: out of the fast lane (pytest -m 'not slow')

# One process, a tiny model and a tokenizer trained in a second on generated text.
BASE = ["pipeline.stages=1", "bottleneck.segments=1", "bottleneck.method=none", "model.vocab_size=320",
        "model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.max_seq_len=32",
        "data.seq_len=16", "deepspeed.train_micro_batch_size_per_gpu=2", "train.eval_batches=2",
        "tracking.tensorboard=false"]


def words(n: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ne", "su", "ta", "ri", "po", "an", "el", "or", "us"]
    lines = (" ".join("".join(rng.choices(syllables, k=rng.randint(1, 3))) for _ in range(12)) for _ in range(n))
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad_inputs")
    (d / "good.txt").write_text(words(600))
    (d / "empty.txt").write_bytes(b"")
    (d / "binary.txt").write_bytes(bytes(range(256)) * 8)
    (d / "latin1.txt").write_bytes(words(600).encode() + "caf\u00e9 na\u00efve\n".encode("latin-1"))
    (d / "short.txt").write_text("ka lo mi\n")                     # 4 tokens: not one sequence
    (d / "data.csv").write_text("text\nka lo\n")
    (d / "body.jsonl").write_text("".join(json.dumps({"body": line}) + "\n" for line in words(600).splitlines()))
    (d / "a_directory").mkdir()
    (d / "bad.yaml").write_text("model:\n  hidden_size: [64\n")
    (d / "list.yaml").write_text("- model\n- train\n")
    (d / "bad_ds.json").write_text('{"train_micro_batch_size_per_gpu": 2,\n "gradient_clipping": }\n')
    (d / "a_file").write_text("")
    hf = d / "hf_bad_json"
    hf.mkdir()
    (hf / "config.json").write_text('{"model_type": "llama", "hidden_size": 32,')
    # a real tiny Llama, then copies with its weights missing, truncated or garbage
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                                         rms_norm_eps=1e-5))
    for name in ("hf_missing", "hf_truncated", "hf_garbage"):
        llama.config.save_pretrained(d / name)
    weights = d / "hf_truncated" / "model.safetensors"
    save_file({k: v.contiguous() for k, v in llama.state_dict().items()}, str(weights))
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    (d / "hf_garbage" / "model.safetensors").write_bytes(random.Random(1).randbytes(4096))
    return d


def resume_dir(root: Path) -> Path:
    """A run directory as a 1-process run leaves it: config.yaml, layout.json, checkpoints/step1."""
    out = root / "resume_run"
    if not out.is_dir():
        cfg = load_config("cpu-demo", [*BASE, f"train.out_dir={out}", f"data.train_path={root / 'good.txt'}"])
        (out / "checkpoints" / "step1").mkdir(parents=True)
        (out / "checkpoints" / "latest").write_text("step1")
        write_manifest(out / "checkpoints" / "step1")
        (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        (out / "layout.json").write_text(json.dumps({"pipeline.stages": 1, "data_parallel": 2}))
    return out


def train_argv(d: Path, *extra, out=None):
    return ["--config", "cpu-demo", *BASE, f"train.out_dir={out or d / 'out'}", f"data.train_path={d / 'good.txt'}",
            *extra, "--dry-run"]


# (id, argv for train.main (d = the files directory), phrases the one line must hold)
TRAIN_ROWS = [
    ("yaml-malformed", lambda d: ["--config", str(d / "bad.yaml")], ["bad.yaml", "not valid YAML", "at line"]),
    ("yaml-list", lambda d: ["--config", str(d / "list.yaml")], ["list.yaml", "mapping"]),
    ("override-no-key", lambda d: train_argv(d, "=[64"), ["override", "section.key=value"]),
    ("override-bad-yaml", lambda d: train_argv(d, "model.hidden_size=[64"), ["model.hidden_size", "not valid YAML"]),
    ("override-no-equals", lambda d: train_argv(d, "model.hidden_size"), ["override", "section.key=value"]),
    ("data-csv", lambda d: train_argv(d, f"data.train_path={d / 'data.csv'}"), ["data.train_path", "data.csv", ".txt"]),
    ("data-directory", lambda d: train_argv(d, f"data.train_path={d / 'a_directory'}"), ["data.train_path", "directory"]),
    ("data-text-field-missing", lambda d: train_argv(d, f"data.train_path={d / 'body.jsonl'}"),
     ["data.text_field='text'", "body.jsonl", "'body'"]),
    ("data-missing", lambda d: train_argv(d, f"data.val_path={d / 'nope.txt'}"), ["data.val_path", "nope.txt"]),
    ("tokenizer-model-missing", lambda d: train_argv(d, "data.tokenizer=sentencepiece",
                                                     f"data.tokenizer_path={d / 'no.model'}"), ["data.tokenizer_path", "no.model"]),
    ("tokenizer-bpe", lambda d: train_argv(d, "data.tokenizer=bpe"), ["data.tokenizer", "'bpe'", "sentencepiece-train"]),
    ("tokenizer-hf-offline", lambda d: train_argv(d, "data.tokenizer=hf", "data.tokenizer_path=resbm-test/no-such-tok"),
     ["data.tokenizer_path", "no-such-tok"]),
    ("spm-train-tiny-file", lambda d: train_argv(d, f"data.train_path={d / 'short.txt'}", "model.vocab_size=4096"),
     ["data.train_path", "short.txt", "model.vocab_size"]),
    ("hf-config-json-invalid", lambda d: train_argv(d, f"model.init_from_hf={d / 'hf_bad_json'}"), ["config.json", "hf_bad_json"]),
    ("deepspeed-json-malformed", lambda d: train_argv(d, f"deepspeed={d / 'bad_ds.json'}"), ["bad_ds.json", "line 2 column"]),
    ("deepspeed-key-wrong-type", lambda d: train_argv(d, "deepspeed.zero_optimization.reduce_bucket_size=x"),
     ["deepspeed.zero_optimization.reduce_bucket_size", "integer"]),
    ("deepspeed-unknown-key", lambda d: train_argv(d, "deepspeed.zero_optimization.bogus=1"),
     ["deepspeed.zero_optimization.bogus", "not permitted"]),
    ("deepspeed-clipping-text", lambda d: train_argv(d, "deepspeed.gradient_clipping=abc"), ["deepspeed.gradient_clipping", ">= 0"]),
    *[(f"{k}-0", lambda d, k=k: train_argv(d, f"train.{k}=0"), [f"train.{k}", ">= 1"])
      for k in ("eval_every", "save_every", "log_every")],
    ("eval_batches-negative", lambda d: train_argv(d, "train.eval_batches=-1"), ["train.eval_batches", ">= 0"]),
    ("betas-1.5", lambda d: train_argv(d, "train.betas=[1.5,0.9]"), ["train.betas", "[0, 1)"]),
    ("seed-negative", lambda d: train_argv(d, "seed=-1"), ["seed=-1", ">= 0"]),
    ("init_std-negative", lambda d: train_argv(d, "model.init_std=-1"), ["model.init_std", ">= 0"]),
    ("norm_eps-negative", lambda d: train_argv(d, "model.norm_eps=-1"), ["model.norm_eps", "> 0"]),
    ("norm_eps-zero", lambda d: train_argv(d, "model.norm_eps=0"), ["model.norm_eps", "> 0"]),
    ("min_lr_ratio-negative", lambda d: train_argv(d, "train.min_lr_ratio=-2"), ["train.min_lr_ratio", "[0, 1]"]),
    ("min_lr_ratio-above-1", lambda d: train_argv(d, "train.min_lr_ratio=1.5"), ["train.min_lr_ratio", "[0, 1]"]),
    ("warmup_steps-negative", lambda d: train_argv(d, "train.warmup_steps=-5"), ["train.warmup_steps", ">= 0"]),
    *[(f"{key}-{kind}", lambda d, key=key, kind=kind: train_argv(d, f"data.{key}={d / f'{kind}.txt'}"),
       [f"data.{key}", f"{kind}.txt", phrase])
      for key in ("train_path", "val_path")
      for kind, phrase in (("empty", "empty"), ("binary", "binary"), ("latin1", "not UTF-8"), ("short", "sequences"))
      if not (key == "train_path" and kind == "short")],   # a short train file fails tokenizer training first
    ("train-too-short-for-a-batch", lambda d: train_argv(d, f"data.train_path={d / 'short.txt'}",
                                                         "data.tokenizer=sentencepiece",
                                                         f"data.tokenizer_path={d / 'good.model'}"),
     ["data.train_path", "short.txt", "sequences"]),
    ("val_path-without-train_path", lambda d: [a for a in train_argv(d, f"data.val_path={d / 'short.txt'}",
                                                                     "model.vocab_size=4096")
                                               if not a.startswith("data.train_path=")],
     ["data.val_path", "short.txt", "sequences"]),   # validated with the default corpus training
    # an unreachable tracking server: one line within seconds (before: silence for minutes at step 1)
    *[(f"mlflow_uri-{kind}", lambda d, uri=uri: train_argv(d, "tracking.mlflow=true", f"tracking.mlflow_uri={uri}"),
       ["tracking.mlflow_uri", f"cannot reach {host} within 10 s"])
      for kind, uri, host in (("refused", "http://127.0.0.1:9/", "127.0.0.1:9"),
                              ("no-route", "http://192.0.2.1:5000", "192.0.2.1:5000"))],
    ("out_dir-under-a-file", lambda d: train_argv(d, out=d / "a_file" / "run"), ["train.out_dir", "a_file"]),
    ("out_dir-unwritable", lambda d: train_argv(d, out="/proc/resbm-run"), ["train.out_dir", "/proc"]),
    *[(f"init_from_hf-{kind}", lambda d, kind=kind: train_argv(d, f"model.init_from_hf={d / f'hf_{kind}'}"),
       [f"hf_{kind}", "safetensors"]) for kind in ("missing", "truncated", "garbage")],
    # --resume with a key changed that the checkpoint cannot follow (the run was saved with BASE)
    *[(f"resume-{args[0].split('=')[0]}", lambda d, args=args: train_argv(d, *args, "--resume", out=resume_dir(d)),
       ["--resume", args[0].split("=")[0], "cannot change mid-run"])
      for args in (["bottleneck.width=8"], ["bottleneck.ratio=4"], ["model.hidden_size=64"], ["model.num_layers=4"],
                   ["bottleneck.identity=none"], ["bottleneck.method=bottleneck-noskip", "bottleneck.segments=2"],
                   ["pipeline.stages=2", "bottleneck.segments=2"], ["train.optimizer=muon"], ["data.seq_len=8"],
                   ["seed=7"])],
    ("resume-dp", lambda d: train_argv(d, "--resume", out=resume_dir(d)), ["--resume", "data_parallel", "2 -> 1"]),
]


def one_error_line(capsys, code, phrases):
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip() and "WARNING" not in ln]   # DeepSpeed's import warning
    assert code == 2, (code, err[-3000:])
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err[-3000:]
    for phrase in phrases:
        assert phrase in lines[0], (phrase, lines[0])
    return lines[0]


def call(main, argv) -> int:
    try:
        return main(argv)
    except SystemExit as e:   # argparse's own usage errors
        return e.code


@pytest.fixture(scope="module")
def spm_model(files):
    """A sentencepiece model trained on good.txt (for the row whose train text is too short)."""
    from resbm_ds.data.tokenizer import train_sentencepiece
    import shutil
    shutil.copyfile(train_sentencepiece([str(files / "good.txt")], 320), files / "good.model")


@pytest.mark.parametrize("row", TRAIN_ROWS, ids=[r[0] for r in TRAIN_ROWS])
def test_train_refuses_bad_input_in_one_line(row, files, spm_model, capsys, monkeypatch):
    _, argv, phrases = row
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    if row[0] == "resume-dp":
        monkeypatch.setenv("WORLD_SIZE", "1")
    elif row[0].startswith("resume-"):   # the saved layout: 2 data-parallel ranks of one stage
        monkeypatch.setenv("WORLD_SIZE", "4" if row[0] == "resume-pipeline.stages" else "2")
    one_error_line(capsys, call(train.main, argv(files)), phrases)


def test_good_input_passes_the_same_checks(files, spm_model, capsys):
    """The control: the base arguments pass (so each row fails for its own reason)."""
    assert call(train.main, train_argv(files)) == 0, capsys.readouterr().err[-3000:]
    assert "dry run" in capsys.readouterr().out


@pytest.mark.parametrize("given", ["neither", "train_path", "val_path", "both"])
def test_every_combination_of_train_and_val_path_is_honoured(files, spm_model, capsys, given):
    """The plan line names the text each side reads: the default corpus for what is not given, and
    the training text for validation when only data.train_path is."""
    from resbm_ds.data.corpus import default_dir
    paths = {"train_path": files / "good.txt", "val_path": files / "body.jsonl"}
    chosen = {k: v for k, v in paths.items() if given in (k, "both")}
    vocab = [] if "train_path" in chosen else ["model.vocab_size=4096"]   # the corpus' tokenizer
    argv = [a for a in train_argv(files, *(f"data.{k}={v}" for k, v in chosen.items()), "data.text_field=body", *vocab)
            if not a.startswith("data.train_path=") or "train_path" in chosen]
    assert call(train.main, argv) == 0, capsys.readouterr().err[-3000:]
    (plan,) = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[resbm] plan:")]
    corpus = default_dir()
    train_text = chosen.get("train_path", corpus / "train.txt")
    val_text = chosen.get("val_path", "on the training text (no data.val_path)" if "train_path" in chosen
                          else corpus / "val.txt")
    assert f"; data {train_text}, validation {val_text}; out_dir" in plan, plan


@pytest.mark.parametrize("kind", ["missing", "truncated", "garbage"])
def test_hf_config_refuses_broken_weights(kind, files, capsys):
    one_error_line(capsys, call(hf_cli.main, ["config", str(files / f"hf_{kind}"), "data.seq_len=16"]), [f"hf_{kind}", "safetensors"])


# ---- the real command line: one process, and two ranks under the deepspeed launcher ------------------

def run_cli(cmd, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(REPO), "MASTER_PORT": str(free_port())}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("extra,phrase", [(["train.eval_every=0"], "train.eval_every"),
                                          (["data.val_path={d}/latin1.txt"], "latin1.txt")])
def test_python_m_train_prints_one_line(files, extra, phrase):
    extra = [e.format(d=files) for e in extra]
    argv = [a for a in train_argv(files, *extra) if a != "--dry-run"]
    proc = run_cli([sys.executable, "-m", "resbm_ds.train", *argv])
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error")]
    assert proc.returncode == 2 and len(lines) == 1 and phrase in lines[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and not (files / "out").exists()


def test_deepspeed_launcher_prints_one_line_for_two_ranks(files):
    argv = [a for a in train_argv(files, "model.norm_eps=-1", "pipeline.stages=2", "bottleneck.segments=2")
            if a != "--dry-run"]
    proc = run_cli(["deepspeed", "--num_gpus=2", f"--master_port={free_port()}", "--module", "resbm_ds.train", *argv])
    out = proc.stdout + proc.stderr
    lines = [ln for ln in out.splitlines() if "error: " in ln]
    assert proc.returncode != 0 and "Traceback" not in out, out[-3000:]
    assert len(lines) == 1 and "model.norm_eps" in lines[0], out[-3000:]


# ---- shell safety: what the pdsh launcher would send to the remote shell ----------------------------

def pdsh_remote_tail(user_args) -> str:
    """The training arguments of the command DeepSpeed's real PDSH runner hands each remote shell."""
    import argparse
    from deepspeed.launcher.multinode_runner import PDSHRunner

    args = argparse.Namespace(user_args=list(user_args), user_script="resbm_ds.train", ssh_port=None, launcher_args="",
                              master_addr="node1", master_port=29500, venv_script=None, no_python=False, module=True,
                              no_local_rank=False, save_pid=False, enable_each_rank_log="None")
    cmd, _, _ = PDSHRunner(args, "e30=").get_cmd({}, {"node1": [0], "node2": [0]})
    remote = " ".join(cmd[cmd.index("-w") + 2:])   # pdsh sends the rest as one string
    return remote.split(" resbm_ds.train ", 1)[1]


def test_pdsh_command_quotes_every_argument(tmp_path):
    """launchers/deepspeed_hostfile.sh quotes each training argument for the remote shell (DeepSpeed's
    PDSH runner quotes only arguments with spaces); a real `sh` reads the command DeepSpeed builds
    (no ssh) and must see exactly the arguments and run nothing."""
    nasty = ["data.train_path=/x;id>f", "train.out_dir=$(id>g)", "x='y'", "tracking.run_name=a b",
             "train.betas=[0.9,0.95]", "train.out_dir=`id>h`"]
    script = str(REPO / "launchers" / "deepspeed_hostfile.sh")
    quoted = subprocess.run(["bash", script, "--print-quoted", *nasty], capture_output=True, text=True, timeout=60)
    assert quoted.returncode == 0, quoted.stderr

    def remote_shell_reads(user_args):
        proc = subprocess.run(["sh", "-c", "printf '%s\\n' " + pdsh_remote_tail(user_args)], cwd=tmp_path,
                              capture_output=True, text=True, timeout=60)
        return proc.stdout.splitlines(), sorted(p.name for p in tmp_path.iterdir())

    assert remote_shell_reads(nasty)[1] == ["f", "g", "h"]   # unquoted, the remote shell runs `id` three times
    for p in tmp_path.iterdir():
        p.unlink()
    assert remote_shell_reads(quoted.stdout.splitlines()) == (nasty, [])
    refused = subprocess.run(["bash", script, "--print-quoted", "tracking.run_name=a $(id)"],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and refused.stderr.startswith("error: ") and "$(id)" in refused.stderr


@pytest.mark.parametrize("kind, endpoint, host", [("refused", "http://127.0.0.1:9", "127.0.0.1:9"),
                                                  ("no-route", "http://192.0.2.1:443", "192.0.2.1:443")])
@pytest.mark.parametrize("reads", ["data.source=hub", "data.tokenizer=hf"])
def test_an_unreachable_hub_is_one_line_within_its_deadline(files, capsys, monkeypatch, kind, endpoint, host, reads):
    """A run that reads from the hub while the hub cannot be reached: one line within 10 s before
    launch (192.0.2.1 is TEST-NET-1, never routed), not every rank waiting in its first download."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    extra = [reads, "data.tokenizer_path=resbm-test/no-such-tok"] if reads == "data.tokenizer=hf" else [reads]
    argv = [a for a in train_argv(files, *extra) if not (reads == "data.source=hub" and a.startswith("data.train_path="))]
    t0 = time.monotonic()
    line = one_error_line(capsys, call(train.main, argv), [f"cannot reach {host} within 10 s", "HF_HUB_OFFLINE=1"])
    assert ("data.hub_name" if reads == "data.source=hub" else "data.tokenizer_path") in line
    assert time.monotonic() - t0 < 30
