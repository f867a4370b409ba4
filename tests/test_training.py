"""Smoke tests of the training plumbing: train a few iterations on the phantoms, evaluate the
checkpoint, resume after Ctrl-C, NaN guard, command-line errors. They prove the plumbing, not a method."""
import os
import signal
from pathlib import Path

import pytest
import torch

import common
from conftest import run

REPO = Path(__file__).resolve().parents[1]
TINY2D = ["--dataset", "Phantom2D", "--patch_size", "32", "32", "--batch_size", "2", "--labeled_bs", "2",
          "--num_workers", "0"]  # a later --batch_size overrides (argparse keeps the last)
TINY3D = ["--dataset", "Phantom3D", "--patch_size", "32", "32", "16", "--batch_size", "2", "--labeled_bs", "2",
          "--num_workers", "0"]


def test_supervised_2d_then_test_2d(tmp_path):
    run("train_supervised.py", *TINY2D, "--labeled_num", "2", "--max_iterations", "6", "--val_interval", "3",
        "--model_dir", str(tmp_path))
    folder = tmp_path / "Phantom2D_run_2_labeled" / "supervised"
    assert {"args.json", "log.txt", "metrics.csv", "best.pth", "last.pth"} <= {p.name for p in folder.iterdir()}
    rows = (folder / "metrics.csv").read_text().splitlines()
    assert rows[0].split(",")[:4] == ["iteration", "lr", "loss", "time"] and "val_dice_LV" in rows[0]
    assert len(rows) == 7 and rows[3].split(",")[0] == "3" and rows[3].split(",")[4] != ""  # validated at 3
    ckpt = torch.load(folder / "last.pth", weights_only=False)
    assert ckpt["iteration"] == 6 and ckpt["dataset"] == "Phantom2D" and ckpt["method"] == "supervised"
    out = run("test_2d.py", "--ckpt", str(folder / "last.pth"), "--split", "val")
    assert "patient013_frame01" in out and "LV     dice" in out and "cases 6" in out
    assert (folder / "last_val_cases.csv").is_file() and (folder / "last_val_summary.csv").is_file()
    with pytest.raises(AssertionError, match="use test_2d.py"):
        run("test_3d.py", "--ckpt", str(folder / "last.pth"))


def test_supervised_3d_then_test_3d_with_nifti(tmp_path):
    run("train_supervised.py", *TINY3D, "--labeled_num", "2", "--max_iterations", "3", "--model_dir", str(tmp_path))
    ckpt = tmp_path / "Phantom3D_run_2_labeled" / "supervised" / "last.pth"
    assert not (ckpt.parent / "best.pth").exists()  # no validation split: the final checkpoint only
    out = run("test_3d.py", "--ckpt", str(ckpt), "--save_nii", "--sw_batch_size", "8", "--stride", "32", "32", "16")
    assert "case016" in out and "cases 4" in out
    import nibabel as nib
    pred = nib.load(ckpt.parent / "last_test_nii" / "case016_pred.nii.gz")
    gt = nib.load(ckpt.parent / "last_test_nii" / "case016_gt.nii.gz")
    assert pred.shape == gt.shape and len(pred.shape) == 3


def run_interrupted(script, args, stop_at, monkeypatch):
    """Run a training script (in this process, as conftest.run) and send it a real SIGINT from inside
    step() of 0-based iteration stop_at: the stop point is exact, however slow or loaded the machine."""
    step = common.Run.step

    def step_after_a_signal(self, iteration, logs):
        if iteration == stop_at:
            os.kill(os.getpid(), signal.SIGINT)  # its handler runs before the next line
        return step(self, iteration, logs)

    with monkeypatch.context() as m:
        m.setattr(common.Run, "step", step_after_a_signal)
        with pytest.raises(AssertionError, match="exited with 130"):
            run(script, *args)


@pytest.mark.parametrize("script,method,batch", [("train_supervised.py", "supervised", ["--batch_size", "2"]),
                                                 ("train_cifp.py", "cifp", ["--batch_size", "4"]),
                                                 ("train_dualnet_kl.py", "dualnet_kl", ["--batch_size", "4"]),
                                                 ("train_ducisc.py", "ducisc", ["--batch_size", "4"]),
                                                 ("train_icl.py", "icl", ["--batch_size", "4"]),
                                                 ("train_ucseg.py", "ucseg", ["--batch_size", "4"])])
def test_ctrl_c_then_resume_equals_an_uninterrupted_run(tmp_path, script, method, batch, monkeypatch):
    n, stop_at = 6, 2  # SIGINT during 0-based iteration 2: last.pth at iteration 3
    args = [*TINY2D, *batch, "--labeled_num", "2", "--max_iterations", str(n), "--val_split", "none",
            "--save_interval", "100000", "--lr_schedule", "poly", "--threads", "1"]
    run(script, *args, "--model_dir", tmp_path / "a")
    b = tmp_path / "b"
    run_interrupted(script, [*args, "--model_dir", b], stop_at, monkeypatch)
    folder = b / "Phantom2D_run_2_labeled" / method
    assert torch.load(folder / "last.pth", weights_only=False)["iteration"] == stop_at + 1
    run(script, *args, "--model_dir", b, "--resume")
    wa = torch.load(tmp_path / "a" / folder.relative_to(b) / "last.pth", weights_only=False)
    wb = torch.load(folder / "last.pth", weights_only=False)
    assert wb["iteration"] == n
    for name in wa["models"]:  # every model (second network, teacher) and the method state
        for k, v in wa["models"][name].items():
            assert torch.equal(v, wb["models"][name][k]), (name, k)
    for k, v in wa["method_state"].items():
        assert torch.equal(torch.as_tensor(v), torch.as_tensor(wb["method_state"][k])), k
    rows = (folder / "metrics.csv").read_text().splitlines()
    assert [int(r.split(",")[0]) for r in rows[1:]] == list(range(1, n + 1))  # no gap, no duplicate


def make_run(tmp_path, extra=()):
    parser = common.add_common_args(__import__("argparse").ArgumentParser())
    args = common.parse_args(parser, [*TINY2D, "--labeled_num", "2", "--max_iterations", "10", "--val_split", "none",
                                      "--model_dir", str(tmp_path), *extra])
    net = common.default_network(common.get_dataset("Phantom2D"))
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    return common.Run(args, "supervised", {"net": net}, {"optimizer": opt})


def test_nan_guard_names_the_term_and_keeps_the_last_checkpoint(tmp_path):
    r = make_run(tmp_path)
    r.bar = __import__("tqdm").tqdm(disable=True)
    r.step(0, {"loss": torch.tensor(1.0), "loss_sup": torch.tensor(0.5)})
    r.save_last()
    before = (r.dir / "last.pth").read_bytes()
    with pytest.raises(SystemExit, match=r"loss_sup is nan at iteration 2: stopping\. Nothing was saved"):
        r.step(1, {"loss": torch.tensor(1.0), "loss_sup": torch.tensor(float("nan"))})
    with pytest.raises(SystemExit, match="loss is inf at iteration 2"):
        r.step(1, {"loss": torch.tensor(float("inf"))})
    assert (r.dir / "last.pth").read_bytes() == before


def test_existing_run_needs_resume(tmp_path):
    r = make_run(tmp_path)
    r.save_last()
    with pytest.raises(common.DataError, match="pass --resume"):
        make_run(tmp_path)
    with pytest.raises(common.DataError, match="--resume: .* does not exist"):
        make_run(tmp_path / "other", ["--resume"])
