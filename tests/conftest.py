import contextlib
import io
import os
import runpy
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO))


@pytest.fixture
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (the shared/ folder beside the repository)")
    return SHARED_DATA


# Method smoke runs: a few iterations on the phantoms with tiny patches (add --max_iterations, --model_dir).
SMOKE_2D = ["--dataset", "Phantom2D", "--labeled_num", "2", "--patch_size", "32", "32", "--batch_size", "4",
            "--labeled_bs", "2", "--num_workers", "0", "--val_interval", "2"]
SMOKE_3D = ["--dataset", "Phantom3D", "--labeled_num", "2", "--patch_size", "32", "32", "16", "--batch_size", "4",
            "--labeled_bs", "2", "--num_workers", "0"]
COARSE = ["--stride", "32", "32", "16"]  # test_3d.py on a SMOKE_3D checkpoint: windows side by side, no overlap


def run(script, *args):
    """Run a repository script (train_*.py, test_*.py) as `python script args...` from the repository root
    would, but in this process: a fresh interpreter costs about 2 s of imports per call, most of a smoke
    test. Returns its stdout; a non-zero exit fails the test with its stderr. Tests of what only a process
    shows (exit status, signals, the one-line error) start a real one (test_runner.py)."""
    out, err = io.StringIO(), io.StringIO()
    saved = sys.argv, os.getcwd(), torch.get_num_threads()
    sys.argv = [str(REPO / script), *map(str, args)]
    os.chdir(REPO)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_path(str(REPO / script), run_name="__main__")
    except SystemExit as e:
        if e.code not in (0, None):
            raise AssertionError(f"{script} {' '.join(map(str, args))} exited with {e.code}:\n{err.getvalue()}")
    finally:
        sys.argv = saved[0]
        os.chdir(saved[1])
        torch.set_num_threads(saved[2])
    return out.getvalue()
