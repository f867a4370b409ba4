"""--viz_interval: the panel files exist with their named panels, and every map a script hands to the
writer is a tensor its losses (or the module that builds its pseudo-label) received or returned in that
iteration, not a recomputation: the same memory."""
import importlib
import json

import pytest
import torch
from PIL import Image

import common
import train_ucseg
from conftest import SMOKE_2D, SMOKE_3D

# What each script's maps must come from: the functions (module attribute or class method) whose
# tensor arguments and results are recorded.
SOURCES = {
    "supervised": [(common, "supervised_loss")],
    "ducisc": ["deepsup_loss", "certain_masks", (common, "one_hot")],
    "dualnet_kl": ["cosine_loss", "fused_label", "unreliable_mask", "kl_weighted_loss"],
    "ucseg": ["seg_loss", "hard_prediction", (train_ucseg.UPG, "forward")],
    "icl": ["usc_loss", "con_loss", "spa_loss"],
    "cifp": ["fuse"],
}
PANELS = {
    "supervised": ["image", "label", "prediction"],
    "ducisc": ["image", "prediction", "teacher pseudo-label", "certain mask", "thresholds (scale x class)"],
    "dualnet_kl": ["image", "prediction A", "prediction B", "fused pseudo-label", "unreliable (entropy filter)",
                   "KL weight w"],
    "ucseg": ["image", "fused prediction", "uncertainty u1 (U-Net)", "uncertainty u2 (V-Net)", "UPG attention A",
              "UPG pseudo-label"],
    "icl": ["image", "prediction", "SSPA M_1", "SSPA M_2", "SSPA M_3", "USCL G_1", "USCL G_2", "USCL G_3"],
    "cifp": ["image", "P_w", "P_fp", "P_cifp", "weight w", "weight cifp", "weight fp", "fused pseudo-label",
             "reliability r"],
}


def tensors(obj):
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            yield from tensors(x)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from tensors(x)


def record_storages(monkeypatch, module, names):
    """Wrap each named function; return the set of storages of every tensor they received or returned."""
    seen = set()

    def wrap(fn):
        def recorded(*args, **kwargs):
            out = fn(*args, **kwargs)
            for t in tensors([args, kwargs, out]):
                seen.add(t.untyped_storage().data_ptr())
            return out
        return recorded

    for name in names:
        owner, attr = (module, name) if isinstance(name, str) else name
        monkeypatch.setattr(owner, attr, wrap(getattr(owner, attr)))
    return seen


@pytest.mark.parametrize("method", list(PANELS))
def test_panels_hold_the_tensors_the_losses_use(method, tmp_path, monkeypatch):
    module = importlib.import_module(f"train_{method}")
    seen = record_storages(monkeypatch, module, SOURCES[method])
    handed = []
    real_save = common.save_panel

    def save_and_keep(path, image, maps, *args):
        handed.append(maps)
        real_save(path, image, maps, *args)

    monkeypatch.setattr(common, "save_panel", save_and_keep)
    module.main([*map(str, SMOKE_2D), "--max_iterations", "2", "--viz_interval", "2", "--val_split", "none",
                 "--threads", "1", "--model_dir", str(tmp_path)])
    assert len(handed) == 1  # after iteration 2 only
    for name, value in handed[0].items():
        if torch.is_tensor(value):
            assert value.untyped_storage().data_ptr() in seen, f"{method}: {name!r} is not a tensor its losses use"
    png = tmp_path / "Phantom2D_run_2_labeled" / method / "viz" / "iteration_000002.png"
    assert json.loads(Image.open(png).text["Panels"]) == PANELS[method]


def test_3d_panel_shows_the_middle_slice(tmp_path):
    import train_ducisc
    train_ducisc.main([*map(str, SMOKE_3D), "--max_iterations", "1", "--viz_interval", "1", "--threads", "1",
                       "--model_dir", str(tmp_path)])
    png = tmp_path / "Phantom3D_run_2_labeled" / "ducisc" / "viz" / "iteration_000001.png"
    image = Image.open(png)
    assert image.text["Title"] == "ducisc, Phantom3D, iteration 1" and image.size[0] > image.size[1]


def test_viz_is_off_by_default(tmp_path):
    import train_supervised
    train_supervised.main([*map(str, SMOKE_2D), "--max_iterations", "1", "--val_split", "none", "--threads", "1",
                           "--model_dir", str(tmp_path)])
    assert not (tmp_path / "Phantom2D_run_2_labeled" / "supervised" / "viz").exists()


def test_save_panel_draws_each_kind_of_map_and_skips_none(tmp_path):
    maps = {"label": torch.randint(0, 4, (16, 16)), "mask": torch.rand(16, 16) > 0.5,
            "scores": torch.randn(4, 16, 16), "weight": torch.rand(16, 16), "table": torch.rand(4, 4),
            "scalar": torch.tensor(0.5), "switched off": None}
    common.save_panel(tmp_path / "p.png", torch.rand(1, 16, 16), maps, "title", 4)
    assert json.loads(Image.open(tmp_path / "p.png").text["Panels"]) == ["image", *list(maps)[:-1]]


def test_plot_run_draws_every_term_lr_and_validation_dice_of_several_runs(tmp_path):
    import plot_run
    for name, scale in (("a", 1.0), ("b", 0.5)):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "args.json").write_text(json.dumps({"labeled_num": 7}))
        rows = ["iteration,lr,loss,loss_u,time,val_dice,val_dice_RV"]
        rows += [f"{i},{0.01 * (1 - i / 10)},{scale / i},{scale},{i}," + ("0.5,0.4" if i % 5 == 0 else ",")
                 for i in range(1, 11)]
        (folder / "metrics.csv").write_text("\n".join(rows) + "\n")
    label, series = plot_run.read_run(tmp_path / "a")
    assert label == "a, 7 labeled" and series["val_dice"] == ((5, 10), (0.5, 0.5)) and len(series["loss"][0]) == 10
    runs = [plot_run.read_run(tmp_path / n) for n in ("a", "b")]
    assert plot_run.panels_of(runs) == ["loss", "loss_u", "lr", "val_dice", "val_dice_RV"]
    out = plot_run.main([str(tmp_path / "a"), str(tmp_path / "b")])
    assert out == tmp_path / "a" / "curves.png" and Image.open(out).size[0] > 0
    assert plot_run.moving_average([1.0, 3.0, 5.0], 2) == [1.0, 2.0, 4.0]
