"""A runner's experience: CPU defaults, signals, time-based saves, bad input caught in one line before
anything is written, --help defaults, the progress bar's terms. Real signals, no wall-clock deadlines."""
import argparse
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import common
import conftest

REPO = Path(__file__).resolve().parents[1]
TINY2D = ["--dataset", "Phantom2D", "--patch_size", "32", "32", "--batch_size", "4", "--labeled_bs", "2",
          "--num_workers", "0", "--labeled_num", "2"]


def run(script, *args, env=None):
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, env=env)


def one_line_error(proc):
    """The process failed and ended with one 'error: ...' line (no usage block, no traceback; progress
    bars and the phantom notice may come before it); returns that line."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode != 0 and lines and lines[-1].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr and "usage:" not in proc.stderr, proc.stderr
    return lines[-1]


def parse(argv, defaults=None):
    return common.parse_args(common.add_common_args(argparse.ArgumentParser()), argv, defaults)


# ---- CPU defaults ----
def test_cpu_defaults_follow_the_free_cores_and_omp_num_threads(monkeypatch):
    before = torch.get_num_threads()
    cores = common.usable_cores()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setattr(common, "busy_cores", lambda: 0.2)  # an idle machine
        a = parse(["--dataset", "Phantom2D", "--device", "cpu"])
        assert a.threads == cores and a.num_workers == 0 and torch.get_num_threads() == a.threads
        assert f"{cores} usable cores; torch threads {cores} (usable cores)" in a.cpu
        monkeypatch.setattr(common, "busy_cores", lambda: 1.2)  # one core taken by another job
        a = parse(["--dataset", "Phantom2D", "--device", "cpu"])
        assert a.threads == max(1, cores - 1) and (cores == 1 or "1.2 busy with other work" in a.cpu)
        monkeypatch.setattr(common, "busy_cores", lambda: 64.0)  # never fewer than one thread
        assert parse(["--dataset", "Phantom2D", "--device", "cpu"]).threads == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        a = parse(["--dataset", "Phantom2D", "--device", "cpu"])
        assert a.threads == 1 and "(OMP_NUM_THREADS)" in a.cpu
        a = parse(["--dataset", "Phantom2D", "--device", "cpu", "--threads", "2", "--num_workers", "3"])
        assert (a.threads, a.num_workers) == (2, 3) and "(--threads)" in a.cpu and "(--num_workers)" in a.cpu
    finally:
        torch.set_num_threads(before)


def test_busy_cores_is_the_busy_fraction_of_this_process_cores(monkeypatch):
    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("no CPU affinity on this platform")
    jiffies = common._cpu_jiffies(os.sched_getaffinity(0))  # the real file parses: busy <= total
    assert 0 <= jiffies[0] <= jiffies[1]
    samples = iter([(1000, 4000), (1150, 4300)])  # 150 of 300 ticks busy over the interval
    monkeypatch.setattr(common, "_cpu_jiffies", lambda cpus: next(samples))
    assert common.busy_cores(interval=0) == pytest.approx(common.usable_cores() * 0.5)


# ---- signals and safety saves ----
def test_sigterm_saves_last_pth_once_and_exits_143(tmp_path):
    """SIGTERM (what `timeout` and schedulers send) as Ctrl-C: the iteration finishes, last.pth is written,
    exit status 143; one message, from the main process only (a loader worker is running)."""
    args = [*TINY2D, "--num_workers", "1", "--max_iterations", "100000", "--val_split", "none",
            "--save_interval", "100000", "--model_dir", tmp_path]
    proc = subprocess.Popen([sys.executable, "train_supervised.py", *map(str, args)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    folder = tmp_path / "Phantom2D_run_2_labeled" / "supervised"
    while proc.poll() is None and not (folder / "metrics.csv").exists():  # inside the loop: handlers installed
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate()
    assert proc.returncode == 143, err
    assert err.count("SIGTERM: finishing") == 1 and "Traceback" not in err, err
    ckpt = torch.load(folder / "last.pth", weights_only=False)
    assert ckpt["iteration"] >= 1 and f"stopped after iteration {ckpt['iteration']}" in err


def test_second_signal_aborts_at_once_and_keeps_last_pth(tmp_path):
    """Two real SIGINTs to a process inside `with run:` and between steps: the first asks to stop after the
    iteration, the second ends the process at once (130), with no traceback; last.pth is untouched."""
    driver = textwrap.dedent(f"""
        import argparse, os, signal, sys, time, torch
        sys.path.insert(0, {str(REPO)!r})
        import common
        args = common.parse_args(common.add_common_args(argparse.ArgumentParser()),
                                 {[*TINY2D, "--val_split", "none", "--model_dir", str(tmp_path)]!r})
        net = common.default_network(common.get_dataset("Phantom2D"))
        run = common.Run(args, "supervised", {{"net": net}}, {{"optimizer": torch.optim.SGD(net.parameters(), lr=0.1)}})
        run.save_last()
        with run:
            os.kill(os.getpid(), signal.SIGINT)
            while not run._stop:  # the Python-level handler runs between bytecodes
                time.sleep(0.01)
            print("first handled", flush=True)
            os.kill(os.getpid(), signal.SIGINT)
            while True:
                time.sleep(0.01)
        """)
    last = tmp_path / "Phantom2D_run_2_labeled" / "supervised" / "last.pth"
    proc = subprocess.run([sys.executable, "-c", driver], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 130 and "first handled" in proc.stdout, proc.stderr
    assert "SIGINT: finishing iteration 1" in proc.stderr and "SIGINT again: aborting at once" in proc.stderr
    assert "Traceback" not in proc.stderr and "KeyboardInterrupt" not in proc.stderr
    assert torch.load(last, weights_only=False)["iteration"] == 0


def test_time_based_safety_save(tmp_path):
    r = make_run(tmp_path, ["--save_minutes", "10"])
    r.bar = __import__("tqdm").tqdm(disable=True)
    r.step(0, {"loss": torch.tensor(1.0)})
    assert not (r.dir / "last.pth").exists()  # neither --save_interval nor 10 minutes reached
    r._saved_at -= 601  # as if ten minutes had passed since the last write
    r.step(1, {"loss": torch.tensor(1.0)})
    assert torch.load(r.dir / "last.pth", weights_only=False)["iteration"] == 2


def make_run(tmp_path, extra=(), method="supervised"):
    args = parse([*TINY2D, "--max_iterations", "10", "--val_split", "none", "--model_dir", str(tmp_path), *extra])
    net = common.default_network(common.get_dataset("Phantom2D"))
    return common.Run(args, method, {"net": net}, {"optimizer": torch.optim.SGD(net.parameters(), lr=0.01)})


# ---- resume ----
def test_resume_refuses_changed_flags_and_extend_allows_a_longer_run(tmp_path):
    r = make_run(tmp_path)
    r.save_last()
    args_json = (r.dir / "args.json").read_text()
    with pytest.raises(common.DataError) as e:
        make_run(tmp_path, ["--resume", "--patch_size", "64", "64", "--max_iterations", "20"])
    assert "--patch_size 64 64 (the run has 32 32)" in str(e.value) and "--max_iterations 20 (the run has 10)" in str(e.value)
    assert "--resume --extend --max_iterations N" in str(e.value)
    assert (r.dir / "args.json").read_text() == args_json  # nothing written
    make_run(tmp_path, ["--resume", "--num_workers", "2", "--threads", "1"])  # how it runs may change
    longer = make_run(tmp_path, ["--resume", "--extend", "--max_iterations", "20"])
    assert longer.args.max_iterations == 20


def test_resume_without_checkpoint_writes_no_folder(tmp_path):
    with pytest.raises(AssertionError, match="error: --resume: .* does not exist"):
        conftest.run("train_supervised.py", *TINY2D, "--model_dir", tmp_path, "--resume")
    assert not any(tmp_path.iterdir())


# ---- bad input: one line naming the flag or file, nothing written ----
@pytest.mark.parametrize("script,extra,message", [
    ("train_icl.py", ["--patch_size", "24", "24"], "--patch_size 24 24: every side must be a multiple of 16"),
    ("train_cifp.py", ["--patch_size", "24", "24"], "e.g. --patch_size 32 32"),
    ("train_supervised.py", ["--labeled_num", "-1"], "--labeled_num must be at least 1"),
    ("train_supervised.py", ["--labeled_num", "50"], "--labeled_num 50 is more than the 12 patients"),
    ("train_supervised.py", ["--labeled_num", "two"], "--labeled_num must be a number or 'all'"),
    ("train_supervised.py", ["--patch_size", "32"], "--patch_size needs 2 numbers"),
    ("train_supervised.py", ["--batch_size", "0"], "--batch_size must be at least 1"),
    ("train_supervised.py", ["--dataset", "ACDC", "--root_path", "/nonexistent/ACDC"],
     "data root /nonexistent/ACDC for --dataset ACDC does not exist"),
    ("train_supervised.py", ["--dataset", "Nope"], "--dataset 'Nope' is unknown"),
    ("train_supervised.py", ["--root_path", "/nonexistent/P2D"], "--root_path /nonexistent/P2D holds no Phantom2D"),
])
def test_bad_flags_stop_before_anything_is_written(tmp_path, script, extra, message):
    with pytest.raises(AssertionError, match="exited with 2") as e:  # in this process: cli()'s error path
        conftest.run(script, *TINY2D, "--max_iterations", "1", "--model_dir", tmp_path, *extra)
    last = str(e.value).strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last and "Traceback" not in str(e.value)
    assert not any(tmp_path.iterdir())


def test_a_bad_flag_is_one_line_from_the_process(tmp_path):
    proc = run("train_icl.py", *TINY2D, "--model_dir", tmp_path, "--patch_size", "24", "24")
    assert "--patch_size 24 24: every side must be a multiple of 16" in one_line_error(proc)


def test_dataset_name_is_case_insensitive():
    assert parse(["--dataset", "phantom2d"]).dataset == "Phantom2D"


def test_corrupt_h5_names_the_file(tmp_path):
    bad = tmp_path / "case.h5"
    bad.write_bytes(b"not an hdf5 file" * 8)
    with pytest.raises(common.DataError, match=f"{bad}: cannot be read as an HDF5 case"):
        common.read_case(bad, 4, 2)
    good = tmp_path / "good.h5"
    with h5py.File(good, "w") as f:
        f["image"], f["label"] = np.zeros((40, 40), np.float32), np.zeros((40, 40), np.uint8)
    (tmp_path / "cut.h5").write_bytes(good.read_bytes()[:1000])  # a truncated copy
    with pytest.raises(common.DataError, match="cut.h5: cannot be read as an HDF5 case"):
        common.read_case(tmp_path / "cut.h5", 4, 2)


def test_test_script_on_a_garbage_checkpoint_is_one_line(tmp_path):
    (tmp_path / "x.pth").write_bytes(b"garbage")
    with pytest.raises(AssertionError, match="error: --ckpt .*x.pth: cannot be read as a PyTorch checkpoint"):
        conftest.run("test_2d.py", "--ckpt", tmp_path / "x.pth")


def test_missing_test_list_suggests_the_val_split(tmp_path):
    (tmp_path / "val.list").write_text("a\n")
    info = common.get_dataset("ACDC")
    with pytest.raises(common.DataError, match="--split val"):
        common.read_list(info, tmp_path, "test")


def test_memory_check_stops_a_model_that_cannot_fit():
    free = common.available_memory("cpu")
    if free is None:
        pytest.skip("no /proc/meminfo here")
    big = int((free / 16) ** 0.5) + 1  # a Linear whose 16 bytes per parameter exceed the memory
    with pytest.raises(common.DataError, match=r"M parameters need about .* GiB .* --smaller"):
        common.check_memory(lambda: [torch.nn.Linear(big, big)], "cpu", "--smaller")
    assert common.check_memory(lambda: [torch.nn.Linear(10, 10)], "cpu", "") == 110


# ---- what the runner sees ----
def test_help_shows_defaults_per_data_set():
    out = run("train_icl.py", "--help").stdout
    flat = " ".join(out.split())
    assert "--max_iterations MAX_ITERATIONS training iterations (default: 30000 for ACDC; " in flat and "Phantom2D 300" in flat
    assert "--patch_size PATCH_SIZE [PATCH_SIZE ...] training patch; every side a multiple of 16 (default: 256x256 for ACDC" in flat
    assert "--seed SEED random seed (default: 1337)" in flat and "--dataset DATASET one of" in flat and "(default: ACDC)" in flat


def test_progress_bar_shows_the_method_terms(tmp_path):
    r = make_run(tmp_path)
    r.progress_terms = ["loss_u"]
    r.bar = __import__("tqdm").tqdm(disable=True)
    r.step(0, {"loss": torch.tensor(1.0), "a": 1.0, "b": 2.0, "c": 3.0, "loss_u": torch.tensor(0.25)})
    assert r.bar.postfix == "loss_u=0.2500"


def test_a_corrupt_training_file_ends_in_one_line_after_the_progress_bar(tmp_path):
    """A truncated h5 file among the training slices: the error names it, and it is the last line
    printed (the reading progress bar is closed first, not redrawn under the message)."""
    info = common.get_dataset("Phantom2D")
    src = common.resolve_root(info)
    for f in src.glob("*.list"):
        (tmp_path / f.name).write_text(f.read_text())
    (tmp_path / "data" / "slices").mkdir(parents=True)
    for f in [*(src / "data").glob("*.h5"), *(src / "data" / "slices").glob("*.h5")]:
        (tmp_path / f.relative_to(src)).symlink_to(f)  # the same files, but for one truncated slice
    name = (src / "train_slices.list").read_text().split()[3]
    bad = tmp_path / "data" / "slices" / f"{name}.h5"
    bad.unlink()
    whole = (src / "data" / "slices" / f"{name}.h5").read_bytes()
    bad.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(AssertionError, match="exited with 2") as e:
        conftest.run("train_supervised.py", *TINY2D, "--root_path", tmp_path, "--model_dir", tmp_path / "m")
    printed = [seg for seg in str(e.value).replace("\r", "\n").split("\n") if seg.strip()]
    assert printed[-1].startswith(f"error: {bad}: cannot be read as an HDF5 case"), printed[-3:]
    assert not (tmp_path / "m").exists()
