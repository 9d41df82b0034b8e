"""Every command's options are range-checked and every path's kind is named when wrong: one line
`error: ...` and exit status 2 before anything runs (resbm_ds/cli.py); environment settings are
checked as config keys are (tests/test_config.py has the runtime.* rows)."""
import importlib
import os
import time

import pytest

from resbm_ds.cli import ArgumentParser, existing_dir, existing_file, float_in, int_at_least, output_dir


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    (d / "file.txt").write_text("ka lo mi\n")
    (d / "dir").mkdir()
    os.mkfifo(d / "fifo")
    return d


# (module with main(argv), argv; {d}: the paths directory, phrases the one line must hold)
ROWS = [
    ("generate", "sample {d}/dir --temperature -1", ["--temperature", "-1 must be in [0, 100]"]),
    ("generate", "sample {d}/dir --temperature nan", ["--temperature", "nan must be in"]),
    ("generate", "sample {d}/dir --max-new-tokens 0", ["--max-new-tokens", "0 must be >= 1"]),
    ("generate", "sample {d}/dir --top-k -3", ["--top-k", "-3 must be >= 0"]),
    ("generate", "sample {d}/dir --seed x", ["--seed", "'x' is not a whole number"]),
    ("generate", "evaluate {d}/dir --micro-batch 0", ["--micro-batch", ">= 1"]),
    ("generate", "evaluate {d}/dir --max-chunks -1", ["--max-chunks", ">= 1"]),
    ("generate", "evaluate {d}/dir --seq-len 0", ["--seq-len", ">= 1"]),
    ("generate", "evaluate {d}/dir --text {d}/dir", ["--text", "is a directory; give a regular file"]),
    ("generate", "evaluate {d}/dir --text {d}/fifo", ["--text", "is a FIFO"]),
    ("generate", "evaluate {d}/dir --text /dev/null", ["--text", "is a character device"]),
    ("generate", "evaluate {d}/dir --text {d}/nope.txt", ["--text", "does not exist"]),
    ("harness", "--out {d}/task --examples 0", ["--examples", ">= 1"]),
    ("harness", "--out {d}/task --context-words -5", ["--context-words", ">= 1"]),
    ("harness", "--out {d}/file.txt", ["--out", "is a regular file; give a directory"]),
    ("spectrum", "{d}/fifo --out {d}/s", ["checkpoints", "is a FIFO; give a directory"]),
    ("spectrum", "{d}/dir --out /dev/null", ["--out", "is a character device"]),
    ("export", "{d}/dir --config {d}/dir", ["--config", "is a directory; give a regular file"]),
    ("export", "{d}/dir --hf {d}/file.txt", ["--hf", "is a regular file"]),
    ("bench.__main__", "--jobs 0", ["--jobs", "0 must be >= 1"]),
    ("bench.__main__", "--steps -2", ["--steps", ">= 1"]),
    ("bench.__main__", "--out {d}/fifo", ["--out", "is a FIFO"]),
    ("netem", "up --nodes 1", ["--nodes", "1 must be >= 2"]),
    ("corpus", "fetch --out {d}/file.txt", ["--out", "is a regular file"]),
    ("train", "--config {d}/dir --dry-run", ["--config", "is a directory, not a file or a preset"]),
    ("train", "--bogus", ["unrecognized arguments: --bogus"]),
]


def main_of(module: str):
    mod = importlib.import_module(f"resbm_ds.{module}")
    return mod.make_task_main if module == "harness" else mod.main


@pytest.mark.parametrize("module, argv, phrases", ROWS, ids=[f"{m}:{a.split(' --')[-1]}" for m, a, _ in ROWS])
def test_a_bad_option_is_one_line_and_exit_2(paths, capsys, module, argv, phrases):
    try:
        code = main_of(module)(argv.format(d=paths).split())
    except SystemExit as e:   # argparse's usage errors
        code = e.code
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and "WARNING" not in ln]
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), (code, err)
    for phrase in phrases:
        assert phrase in err[0], (phrase, err[0])


def test_the_argument_types_accept_what_they_should(paths):
    assert int_at_least(1)("3") == 3 and float_in(0, 1)("0") == 0.0 and float_in(0, low_open=True)("1e9") == 1e9
    assert existing_file(str(paths / "file.txt")).is_file() and existing_dir(str(paths / "dir")).is_dir()
    assert output_dir(str(paths / "new")) == paths / "new" and output_dir(str(paths / "dir")) == paths / "dir"
    p = ArgumentParser(prog="x")
    p.add_argument("--n", type=int_at_least(0))
    assert p.parse_args(["--n", "0"]).n == 0


@pytest.mark.parametrize("module", ["train", "corpus"])
def test_help_and_a_bad_option_answer_before_torch_loads(module):
    """`resbm-train --help` and `resbm-corpus --help` parse before anything heavy is imported."""
    import subprocess
    import sys
    code = (f"import sys\nfrom resbm_ds.{module} import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
            "assert 'torch' not in sys.modules and 'deepspeed' not in sys.modules, sorted(sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr[-2000:]


@pytest.mark.parametrize("local_rank,pauses", [("0", False), ("1", True)])
def test_every_rank_that_lives_to_report_a_bad_input_prints_it(monkeypatch, capsys, local_rank, pauses):
    """Under a launcher local rank 0 prints at once; another rank pauses first (the launcher kills the
    survivors when rank 0 exits), and prints too if it is still alive: rank 0 was slower, or did not fail."""
    from resbm_ds import cli as cli_module
    monkeypatch.setattr(cli_module, "QUIET_RANK_PAUSE_S", 0.5)
    monkeypatch.setenv("LOCAL_RANK", local_rank)

    @cli_module.cli
    def main(argv=None):
        raise FileNotFoundError("/data/corpus.txt")

    t0 = time.perf_counter()
    assert main() == 2
    assert (time.perf_counter() - t0 >= 0.5) == pauses
    assert capsys.readouterr().err.strip() == "error: /data/corpus.txt"
