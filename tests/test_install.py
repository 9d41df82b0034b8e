"""The package as a user installs it: a non-editable `pip install .` holds its presets and DeepSpeed
configs, and `resbm-train --config cpu-demo --dry-run` works from an empty directory."""
import os
import subprocess
import sys

from conftest import REPO
import pytest

pytestmark = pytest.mark.slow   # real launches: out of the fast lane (pytest -m 'not slow')


def test_non_editable_install_runs_a_dry_run_from_an_empty_directory(tmp_path):
    target, empty = tmp_path / "site", tmp_path / "empty"
    empty.mkdir()
    # --no-deps into a private target: the package's own files, as a wheel installs them; its
    # dependencies come from this environment
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(REPO)], check=True, capture_output=True, timeout=600)
    assert (target / "resbm_ds" / "ds_configs" / "cpu_fp32.json").is_file()
    assert not (target / "resbm_ds" / "tests").exists()
    env = {**os.environ, "PYTHONPATH": str(target), "WORLD_SIZE": "2"}   # cpu-demo: 2 stages, as a launcher says
    proc = subprocess.run([sys.executable, "-c", "import resbm_ds, sys; print(resbm_ds.__file__); "
                           "from resbm_ds.train import main; sys.exit(main(['--config', 'cpu-demo', '--dry-run', "
                           f"'train.out_dir={tmp_path / 'run'}']))"],
                          cwd=empty, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.splitlines()[0].startswith(str(target))       # the installed copy, not the checkout
    assert "dry run: config, data and run directory are valid" in proc.stdout
    assert list(empty.iterdir()) == []                                # nothing written where it ran
