import subprocess
import sys
from pathlib import Path

import pytest

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


def run(*args):
    """Run a repository script (train_*.py, test_*.py) in a subprocess; fail the test with its stderr."""
    proc = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout
