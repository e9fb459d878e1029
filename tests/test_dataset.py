"""`qsplat make-dataset`: varied rooms (defaults untouched), teacher caches, 3DGS fits, splits, resuming, and
`train-gsnet --dataset`."""

import json
from pathlib import Path

import numpy as np
import pytest

from qrender_ns.workflows import make_dataset as ds
from qrender_ns.data import scene_generator as sg

import fingerprints

TINY_SCENE = dict(width=48, height=36, num_images=6, num_eval=2, num_points=3000)
TINY_GSNET = dict(stem_channels=8, enc_channels=(8, 16, 16, 16), dec_channels=(16, 16, 8, 8), gaussian_mlp_channels=8,
                  head_channels=32, backend="torch")

def _config(out, **kwargs):
    defaults = dict(out=out, scenes=3, val_scenes=1, seed=7, fit_steps=3, progress=False, **TINY_SCENE)
    return ds.MakeDataset(**{**defaults, **kwargs})


# ------------------------------------------------------------------------------------------- variation
def test_default_rooms_are_unchanged(tmp_path):
    # SceneVariation must leave the default rooms as they were: build_scene and _make_cameras of seeds 0-11 and
    # every file of a small generated scene per layout, against tests/data/default_rooms.json (taken from the
    # generator before SceneVariation existed). Compared within tolerances that hold on any x86-64 CPU
    # (tests/fingerprints.py), not byte for byte.
    expected = json.loads(fingerprints.REFERENCE.read_text())
    diffs = fingerprints.compare_fingerprints(fingerprints.describe_default_rooms(tmp_path), expected)
    assert not diffs, f"{len(diffs)} differences, first: {diffs[:10]}"
    for layout in expected["files"]:
        assert "variation" not in json.loads((tmp_path / layout / "room" / "gt" / "scene.json").read_text())


def test_room_fingerprint_catches_changes(tmp_path):
    # The tolerances are far below what a real change moves: one object's colour, one camera, one pixel column.
    expected = json.loads(fingerprints.REFERENCE.read_text())
    actual = json.loads(fingerprints.REFERENCE.read_text())
    assert fingerprints.compare_fingerprints(actual, expected) == []
    actual["layouts"]["4"]["cameras"][2][0][3] += 1e-4
    actual["layouts"]["7"]["scene"]["room"]["faces"][0]["color"][1] += 1e-3
    image = actual["files"]["scannet"]["color/3.jpg"]
    image["mean"][0] += 0.5
    labels = actual["files"]["nerfstudio"]["gt/classes/frame_00002.png"]["label_pixels"]
    first = next(iter(labels))
    labels[first] += 5
    del actual["files"]["nerfstudio"]["transforms.json"]["frames"][0]
    diffs = fingerprints.compare_fingerprints(actual, expected)
    for where in ("layouts/4/cameras/2/0/3", "layouts/7/scene/room/faces/0/color/1", "color/3.jpg/mean/0",
                  f"frame_00002.png/label_pixels/{first}", "transforms.json/frames"):
        assert any(where in d for d in diffs), (where, diffs)
    # and the generated files of another room differ
    other = fingerprints.describe_files(sg.generate_scene(tmp_path / "other", layout="scannet",
                                                          **{**fingerprints.SCENE_ARGS, "seed": 4}).root)
    assert fingerprints.compare(other, expected["files"]["scannet"], "", fingerprints.FLOAT_TOL)


def test_variation_varies_rooms_objects_colours_and_cameras():
    var = sg.SceneVariation()
    rooms = [sg.build_scene(s, var) for s in range(24)]
    half_x = [r.room.half_x for r in rooms]
    assert min(half_x) < 1.8 and max(half_x) > 2.5  # default rooms: 1.9-2.2
    counts = [len(r.instances) - 6 for r in rooms]
    assert min(counts) < 5 and max(counts) >= 8 and len(set(counts)) >= 4  # default rooms: 5-7
    assert any(len({i.class_name for i in r.instances[6:]}) < len(r.instances) - 6 for r in rooms)  # repeats
    # colours: far from the class palette for some pieces (default jitter: 0.08 per channel)
    offsets = []
    for r in rooms:
        for inst in r.instances[6:]:
            prim = next(p for p in r.prims if p.surface.instance_id == inst.id)
            main, accent = sg._COLORS[inst.class_name]
            offsets.append(min(np.abs(np.subtract(prim.surface.color, c)).max() for c in (main, accent or main)))
    assert max(offsets) > 0.3 and np.mean(np.array(offsets) > 0.08) > 0.2
    paths = set()
    for s, r in enumerate(rooms[:12]):
        cams, path = sg._make_varied_cameras(r, s, 12, var)
        paths.add(path)
        eyes = np.array([c[:3, 3] for c in cams])
        assert all(sg._camera_is_free(r, e) for e in eyes)
        assert eyes[:, 2].std() > 0 and len(cams) == 12
    assert len(paths) >= 2
    # deterministic, and its own stream: not the default room of the same seed
    assert sg.build_scene(5, var).to_json() == sg.build_scene(5, var).to_json()
    assert sg.build_scene(5, var).room.half_x != sg.build_scene(5).room.half_x


def test_varied_scene_records_its_variation(tmp_path):
    info = sg.generate_scene(tmp_path / "room", seed=4, variation=sg.SceneVariation(num_objects=(3, 3)), **TINY_SCENE)
    meta = json.loads(info.scene_json_path.read_text())
    assert meta["variation"]["num_objects"] == [3, 3] and meta["camera_path"] in ("ring", "two-rings", "walk")
    assert len(meta["instances"]) == 6 + 3
    with pytest.raises(ValueError, match="num_objects"):
        sg.SceneVariation(num_objects=(4, 2))


# ------------------------------------------------------------------------------------------- the dataset
@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("dataset") / "D"
    result = ds.make_dataset(_config(out, progress=True))
    return out, result


def test_dataset_layout_splits_and_fits(dataset):
    out, result = dataset
    splits = json.loads((out / "splits.json").read_text())
    assert splits["train"] == ["scene_000", "scene_001"] and splits["val"] == ["scene_002"]
    assert splits["runs"]["plain"]["val"] == ["scene_002/fit-plain/q-splat/plain/config.yml"]
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["complete"] and len(meta["scenes"]) == 3
    rooms = [tuple(s["generate"]["room"]) for s in meta["scenes"]]
    assert len(set(rooms)) == 3
    for row in meta["scenes"]:
        fit = row["fit-plain"]
        assert (out / row["name"] / fit["config"]).is_file()
        assert np.isfinite(fit["psnr"]) and fit["psnr"] > 5 and fit["num_gaussians"] > 100
        assert row["teacher"]["images"] == TINY_SCENE["num_images"]
        assert (out / row["name"] / "qsplat_teacher" / "synthetic" / "manifest.json").is_file()
        assert sg.load_scene(out / row["name"]).room.half_x == pytest.approx(row["generate"]["room"][0])
    assert [s["seed"] for s in meta["scenes"]] == [7000, 7001, 7002]
    assert "PSNR" in result["line"] and "train-gsnet --dataset" in result["line"]


def test_rerun_skips_everything_and_settings_are_checked(dataset, monkeypatch):
    out, _ = dataset
    before = {p: p.stat().st_mtime_ns for p in out.rglob("stages/*.json")}
    monkeypatch.setattr(ds, "generate_scene", lambda *a, **k: pytest.fail("regenerated a finished scene"))
    monkeypatch.setattr(ds, "fit_scene", lambda *a, **k: pytest.fail("refitted a finished scene"))
    ds.make_dataset(_config(out))
    assert {p: p.stat().st_mtime_ns for p in out.rglob("stages/*.json")} == before
    with pytest.raises(ds.DatasetError, match=r"width: 48 -> 40"):
        ds.make_dataset(_config(out, width=40))


def test_crash_mid_fit_is_redone_cleanly(tmp_path, monkeypatch):
    out = tmp_path / "D"
    real_fit, real_generate = ds.fit_scene, ds.generate_scene

    def crashing_fit(scene_dir, kind, steps, **kwargs):
        if scene_dir.name == "scene_001":  # dies half-way: a run folder with a partial checkpoint, no marker
            run = ds.fit_run_dir(scene_dir, kind) / "nerfstudio_models"
            run.mkdir(parents=True)
            (run / "step-000000001.ckpt").write_bytes(b"torn")
            raise KeyboardInterrupt
        return real_fit(scene_dir, kind, steps, **kwargs)

    monkeypatch.setattr(ds, "fit_scene", crashing_fit)
    with pytest.raises(KeyboardInterrupt):
        ds.make_dataset(_config(out, scenes=2, fit_steps=2))
    assert ds.stage_path(out / "scene_000", "fit-plain").is_file()
    assert ds.stage_path(out / "scene_001", "teacher").is_file()
    assert not ds.stage_path(out / "scene_001", "fit-plain").exists()
    assert not (out / "splits.json").exists()
    # scene_002 was not reached; give it a torn generate marker and a stray file, as a kill -9 could leave
    (out / "scene_002" / "stages").mkdir(parents=True)
    (out / "scene_002" / "stray.txt").write_text("half-written")
    ds.stage_path(out / "scene_002", "generate").write_text('{"settings": {"seed"')
    finished = ds.stage_path(out / "scene_000", "fit-plain").read_text()

    generated, fitted = [], []
    monkeypatch.setattr(ds, "generate_scene", lambda d, **k: generated.append(d.name) or real_generate(d, **k))
    monkeypatch.setattr(ds, "fit_scene", lambda d, *a, **k: fitted.append(d.name) or real_fit(d, *a, **k))
    ds.make_dataset(_config(out, scenes=3, fit_steps=2))
    assert generated == ["scene_002"] and fitted == ["scene_001", "scene_002"]
    assert ds.stage_path(out / "scene_000", "fit-plain").read_text() == finished
    assert not (out / "scene_002" / "stray.txt").exists()
    ckpts = list((ds.fit_run_dir(out / "scene_001", "plain") / "nerfstudio_models").glob("*.ckpt"))
    assert [p.name for p in ckpts] == ["step-000000001.ckpt"] and ckpts[0].stat().st_size > 1000
    assert json.loads((out / "splits.json").read_text())["val"] == ["scene_002"]


def _children(pid):
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _running(pid):  # a zombie (dead, not yet reaped by its new parent) does not count
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads Linux /proc")
def test_kill_9_of_make_dataset_takes_its_workers_with_it(tmp_path):
    # --jobs workers (and the queue's manager) must not fit on for a dataset whose writer is gone.
    import os
    import signal
    import subprocess
    import sys
    import time

    cmd = [sys.executable, "-m", "qrender_ns.cli", "make-dataset", "--out", str(tmp_path / "D"), "--scenes", "4",
           "--val-scenes", "1", "--jobs", "2", "--fit-steps", "3000", "--width", "48", "--height", "36",
           "--num-images", "6", "--num-eval", "2", "--num-points", "3000", "--no-progress"]
    main = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # the manager and both workers are up and a scene is being made
            helpers = _children(main.pid)
            if len(helpers) >= 3 and list((tmp_path / "D").glob("scene_*/stages/generate.json")):
                break
            assert main.poll() is None, "make-dataset ended before its workers started"
            time.sleep(0.5)
        else:
            pytest.fail("make-dataset's workers did not start within 120 s")
        main.send_signal(signal.SIGKILL)
        main.wait()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(_running(p) for p in helpers):
            time.sleep(0.2)
        alive = [p for p in helpers if _running(p)]
        for p in alive:
            os.kill(p, signal.SIGKILL)
        assert not alive, f"{len(alive)} of make-dataset's {len(helpers)} helper processes outlived it"
    finally:
        if main.poll() is None:
            main.kill()


def test_bad_settings_are_clear_errors(tmp_path):
    with pytest.raises(ds.DatasetError, match="val-scenes"):
        ds.make_dataset(_config(tmp_path / "a", scenes=2, val_scenes=2))
    with pytest.raises(ds.DatasetError, match="num-eval"):
        ds.make_dataset(_config(tmp_path / "b", num_images=4, num_eval=4))
    for bad in (1.0, -0.2, float("nan")):
        with pytest.raises(ds.DatasetError, match=r"--synthetic-label-noise must be a probability in \[0, 1\)"):
            ds.make_dataset(_config(tmp_path / "e", synthetic_label_noise=bad))
        with pytest.raises(ds.DatasetError, match="--synthetic-miss-rate must be"):
            ds.make_dataset(_config(tmp_path / "e", synthetic_miss_rate=bad))
    assert not (tmp_path / "e").exists()
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "x").write_text("not a dataset")
    with pytest.raises(ds.DatasetError, match="not a dataset"):
        ds.make_dataset(_config(tmp_path / "c"))
    if ds._model_has_depth_loss():
        pytest.skip("this q-splat has --pipeline.model.depth-loss: depth fits are allowed")
    with pytest.raises(ds.DatasetError, match="depth-loss"):
        ds.make_dataset(_config(tmp_path / "d", fits=("plain", "depth")))
    assert not (tmp_path / "d").exists()  # refused before any work


def test_noisy_teacher_reaches_the_cache_and_survives_the_fit(tmp_path, dataset):
    from qrender_ns.teachers.cache import TeacherCache

    out = tmp_path / "D"
    ds.make_dataset(_config(out, scenes=1, val_scenes=0, fit_steps=1, synthetic_label_noise=0.4,
                            synthetic_miss_rate=0.1))
    scene = out / "scene_000"
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["settings"]["synthetic_label_noise"] == 0.4 and meta["settings"]["synthetic_miss_rate"] == 0.1
    # the fit's datamanager names the same teacher: it reused the cache instead of refusing or replacing it
    info = TeacherCache(scene / "qsplat_teacher" / "synthetic").teacher_info
    assert info["label_noise"] == 0.4 and info["miss_rate"] == 0.1
    import yaml

    run = yaml.load((ds.fit_run_dir(scene, "plain") / "config.yml").read_text(), Loader=yaml.Loader)
    assert run.pipeline.datamanager.synthetic_label_noise == 0.4 and run.pipeline.datamanager.synthetic_miss_rate == 0.1
    with pytest.raises(ds.DatasetError, match=r"synthetic_label_noise: 0.4 -> 0.2"):
        ds.make_dataset(_config(out, scenes=1, val_scenes=0, fit_steps=1, synthetic_label_noise=0.2,
                                synthetic_miss_rate=0.1))
    # a dataset made without the options keeps its settings (they are recorded only when on)
    assert not {"synthetic_label_noise", "synthetic_miss_rate"} & set(json.loads(
        (dataset[0] / "dataset.json").read_text())["settings"])


def test_fit_kinds_set_the_depth_loss_option(monkeypatch):
    monkeypatch.setattr(ds, "_model_has_depth_loss", lambda: True)
    assert ds._fit_model_options("plain", None)["depth_loss"] == "off"
    depth = ds._fit_model_options("depth", 0.3)
    assert depth["depth_loss"] == "on" and depth["depth_loss_mult"] == 0.3
    monkeypatch.setattr(ds, "_model_has_depth_loss", lambda: False)
    assert "depth_loss" not in ds._fit_model_options("plain", None)
    with pytest.raises(ds.DatasetError, match="depth-loss"):
        ds._fit_model_options("depth", None)


# ------------------------------------------------------------------------------------------- GS-Net on it
def test_train_gsnet_reads_the_dataset(dataset, tmp_path, capsys):
    from qrender_ns.gsnet.gsnet import GSNetConfig
    from qrender_ns.workflows.gsnet_scenes import load_scene
    from qrender_ns.workflows.train_gsnet import TrainGSNet, train_gsnet

    out, _ = dataset
    assert ds.dataset_scenes(out, "train") == [out / "scene_000/fit-plain/q-splat/plain/config.yml",
                                               out / "scene_001/fit-plain/q-splat/plain/config.yml"]
    fitted = load_scene(ds.dataset_scenes(out, "val")[0])
    assert fitted.gaussians.labels is None and fitted.gaussians.opacities.min() < 0.5  # fitted, not points
    cfg = TrainGSNet(dataset=out, out=tmp_path / "g.ckpt", gsnet=GSNetConfig(**TINY_GSNET), steps=2,
                     scenes_per_step=1, views_per_scene=1, progress=False, tensorboard=True, val_every=1)
    summary = train_gsnet(cfg)
    assert summary["steps"] == 2 and (tmp_path / "g.ckpt").is_file()
    printed = capsys.readouterr().out
    assert "GS-Net at step 1 on 1 val scenes" in printed and "GS-Net at step 2 on 1 val scenes" in printed
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "g_tb")).Reload()
    assert [e.step for e in events.Scalars("gsnet/val_miou_2d")] == [1]  # the final one is in g_val.json
    val = json.loads((tmp_path / "g_val.json").read_text())
    assert val["step"] == 2 and [h["step"] for h in val["history"]] == [1, 2]
    assert [Path(r["scene"]).parts[-5] for r in val["scenes"]] == ["scene_002"] and "miou_2d" in val["mean"]
    none = train_gsnet(TrainGSNet(dataset=out, fit="none", out=tmp_path / "p.ckpt", gsnet=GSNetConfig(**TINY_GSNET),
                                  steps=1, scenes_per_step=1, views_per_scene=1, progress=False, tensorboard=False))
    assert "miou_3d" in none["val"]["mean"]  # point-cloud Gaussians carry labels
    with pytest.raises(SystemExit, match="no 'depth' fits"):
        train_gsnet(TrainGSNet(dataset=out, fit="depth", out=tmp_path / "d.ckpt", progress=False))
