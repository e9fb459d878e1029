"""Teacher cache (format, atomic writes, resume, invalidation, validation) and the synthetic teacher."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from itertools import combinations
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from qrender_ns.data import scene_generator as sg
from qrender_ns.teachers.cache import (CorruptCacheError, TeacherCache, TeacherCacheError, default_cache_root,
                                       image_key, image_sha256)
from qrender_ns.workflows.extract_features import ExtractFeatures
from qrender_ns.teachers.filling import served_image_sha256
from qrender_ns.teachers.synthetic import SyntheticTeacher, SyntheticTextEncoder, class_embedding
from qrender_ns.teachers.text import load_text_encoder

SMALL = dict(num_images=6, width=64, height=48, num_eval=2, num_points=2000)
INFO = {"name": "toy", "model": "none"}
DIM = 16


def _scene(tmp_path, layout="scannet", seed=0) -> sg.SceneInfo:
    return sg.generate_scene(tmp_path / "scene", layout=layout, seed=seed, **SMALL)


def _taught(tmp_path, **kwargs):
    info = _scene(tmp_path)
    teacher = SyntheticTeacher(info.root, **kwargs)
    stats = teacher.run(progress=False)
    return info, teacher, stats


@pytest.fixture(scope="module")
def taught(tmp_path_factory):
    """A scene with a filled synthetic cache; read-only for the tests that use it."""
    info, teacher, _ = _taught(tmp_path_factory.mktemp("taught"))
    return info, teacher, TeacherCache(teacher.cache_root)


def _random_entry(seed=0, h=5, w=7, m=3, dim=DIM):
    rng = np.random.default_rng(seed)
    return rng.integers(-1, m, size=(h, w)), rng.normal(size=(m, dim)) * 3


def _npz_files(root: Path):
    return sorted(p.name for p in root.glob("*.npz"))


# --- cache format -------------------------------------------------------------------------------------


def test_cache_round_trip(tmp_path):
    root = tmp_path / "cache"
    cache = TeacherCache.create(root, INFO, feature_dim=DIM, class_names=["a", "b"], lru_size=2)
    ids, emb = _random_entry()
    cache.write("color/0.jpg", ids, emb, "abc")
    cache.write("images/frame_00001.png", torch.full((2, 2), -1), torch.zeros(0, DIM), "def")  # no masks

    reopened = TeacherCache(root)
    assert reopened.keys() == ["color/0.jpg", "images/frame_00001.png"]
    assert reopened.teacher_info == INFO and reopened.class_names == ["a", "b"] and reopened.feature_dim == DIM
    mask_ids, embeddings = reopened.read("color/0.jpg")
    assert mask_ids.dtype == torch.int64 and embeddings.dtype == torch.float32
    assert mask_ids.shape == (5, 7) and embeddings.shape == (3, DIM)
    assert torch.equal(mask_ids, torch.from_numpy(ids))
    assert torch.allclose(embeddings.norm(dim=1), torch.ones(3), atol=1e-6)
    expected = torch.nn.functional.normalize(torch.from_numpy(emb).float(), dim=1)
    assert torch.allclose(embeddings, expected, atol=2e-3)  # float16 storage
    empty_ids, empty_emb = reopened.read("images/frame_00001.png")
    assert (empty_ids == -1).all() and empty_emb.shape == (0, DIM)

    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["format_version"] == 1 and manifest["feature_dim"] == DIM
    entry = manifest["entries"]["color/0.jpg"]
    assert {k: entry[k] for k in ("image_sha256", "height", "width", "num_masks")} == \
        {"image_sha256": "abc", "height": 5, "width": 7, "num_masks": 3}
    with np.load(root / entry["file"]) as z:
        assert z["mask_ids"].dtype == np.int32 and z["embeddings"].dtype == np.float16
    assert cache.read("color/0.jpg") is cache.read("color/0.jpg")  # LRU


def test_write_rejects_malformed_input(tmp_path):
    cache = TeacherCache.create(tmp_path / "cache", INFO, feature_dim=DIM)
    ids, emb = _random_entry()
    bad = {
        "embeddings must be": (ids, emb[:, :-1]),
        "mask ids span": (ids + 1, emb),
        "NaN or Inf": (ids, np.where(np.eye(3, DIM) > 0, np.nan, emb)),
        "zero norm": (ids, np.zeros_like(emb)),
    }
    for message, (bad_ids, bad_emb) in bad.items():
        with pytest.raises(ValueError, match=message):
            cache.write("color/0.jpg", bad_ids, bad_emb, "abc")
    with pytest.raises(ValueError, match="relative POSIX path"):
        cache.write("../outside.jpg", ids, emb, "abc")
    assert len(cache) == 0 and _npz_files(cache.root) == []


def test_crash_between_npz_and_manifest_leaves_valid_cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    cache = TeacherCache.create(root, INFO, feature_dim=DIM)
    ids, emb = _random_entry(0)
    cache.write("color/0.jpg", ids, emb, "v1")
    before = cache.read("color/0.jpg")

    real_replace = os.replace

    def crash_on_manifest(src, dst):
        if str(dst).endswith("manifest.json"):
            raise OSError("simulated crash")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_manifest)
    new_ids, new_emb = _random_entry(1)
    with pytest.raises(OSError, match="simulated crash"):
        cache.write("color/1.jpg", new_ids, new_emb, "v1")
    with pytest.raises(OSError, match="simulated crash"):
        cache.write("color/0.jpg", new_ids, new_emb, "v2")  # rewriting an entry: the old one must survive
    monkeypatch.setattr(os, "replace", real_replace)

    for view in (cache, TeacherCache(root)):
        assert view.keys() == ["color/0.jpg"]
        assert not view.is_current("color/1.jpg", "v1") and "color/1.jpg" not in view
        assert view.is_current("color/0.jpg", "v1")
        assert all(torch.equal(a, b) for a, b in zip(view.read("color/0.jpg"), before))

    # A kill (no cleanup runs) can leave an unreferenced npz or temporary: the next writer removes them.
    cache.close()  # the writer is gone (its lock with it)
    (root / "color_1.jpg-deadbeef0000.npz").write_bytes(b"partial")
    (root / ".manifest.json.x1.tmp").write_bytes(b"{")
    TeacherCache.create(root, INFO, feature_dim=DIM).close()
    assert _npz_files(root) == [TeacherCache(root).entry("color/0.jpg")["file"]]
    assert sorted(p.name for p in root.iterdir()) == sorted([".lock", "manifest.json", *_npz_files(root)])


def test_corrupt_files_raise_errors_naming_the_file(tmp_path):
    cache = TeacherCache.create(tmp_path / "cache", INFO, feature_dim=DIM)
    ids, emb = _random_entry()
    cache.write("color/0.jpg", ids, emb, "abc")
    path = cache.root / cache.entry("color/0.jpg")["file"]
    unit = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float16)
    corruptions = {
        "manifest says": dict(mask_ids=ids[:, :-1].astype(np.int32), embeddings=unit),
        "embeddings must be": dict(mask_ids=ids.astype(np.int32), embeddings=unit[:, :-1]),
        "mask ids span": dict(mask_ids=ids.astype(np.int32) + 5, embeddings=unit),
        "NaN": dict(mask_ids=ids.astype(np.int32), embeddings=np.full_like(unit, np.nan)),
        "not L2-normalised": dict(mask_ids=ids.astype(np.int32), embeddings=unit * 2),
    }
    for message, arrays in corruptions.items():
        with open(path, "wb") as f:
            np.savez(f, **arrays)
        with pytest.raises(CorruptCacheError, match=message) as err:
            cache.read("color/0.jpg")
        assert str(path) in str(err.value)
    path.write_bytes(b"not a zip file")
    with pytest.raises(CorruptCacheError, match="unreadable") as err:
        cache.read("color/0.jpg")
    assert str(path) in str(err.value) and "--overwrite" in str(err.value)


def test_validate_names_missing_images_and_command(tmp_path):
    info = _scene(tmp_path)
    keys = [image_key(p, info.root) for p in info.image_paths]
    teacher = SyntheticTeacher(info.root)
    teacher.run(image_keys=keys[:2], progress=False)
    cache = TeacherCache(default_cache_root(info.root, "synthetic"))
    cache.validate(keys[:2], sizes=[(48, 64)] * 2)
    with pytest.raises(TeacherCacheError) as err:
        cache.validate(keys, sizes=[(48, 64)] * len(keys))
    message = str(err.value)
    assert all(k in message for k in keys[2:]) and keys[0] not in message and "4 of 6" in message
    assert f"qsplat extract-features --data {info.root} --teacher synthetic" in message
    with pytest.raises(TeacherCacheError, match=r"color/0.jpg \(cache 48x64, image 24x32\)"):
        cache.validate(keys[:1], sizes=[(24, 32)])
    with pytest.raises(TeacherCacheError, match="Run: qsplat extract-features"):
        TeacherCache(tmp_path / "nowhere" / "qsplat_teacher" / "synthetic")


# --- synthetic teacher ----------------------------------------------------------------------------------


def test_resume_skips_current_entries_and_redoes_changed_images(tmp_path):
    info, teacher, stats = _taught(tmp_path)
    assert (stats.written, stats.skipped) == (6, 0)
    files = _npz_files(teacher.cache_root)
    again = teacher.run(progress=False)
    assert (again.written, again.skipped) == (0, 6) and _npz_files(teacher.cache_root) == files

    with open(info.image_paths[3], "ab") as f:  # new bytes, same picture: the key is the served pixels
        f.write(b"\0")
    assert (teacher.run(progress=False).written, len(_npz_files(teacher.cache_root))) == (0, 6)
    picture = np.asarray(Image.open(info.image_paths[3])).copy()
    picture[:4] = 255 - picture[:4]  # other pixels: that image alone is redone
    Image.fromarray(picture).save(info.image_paths[3], quality=100)
    redo = teacher.run(progress=False)
    assert (redo.written, redo.skipped) == (1, 5)
    cache = TeacherCache(teacher.cache_root)
    key = image_key(info.image_paths[3], info.root)
    served = np.asarray(Image.open(info.image_paths[3]).convert("RGB"))
    assert cache.is_current(key, served_image_sha256(served)) and not cache.is_current(key, image_sha256(info.image_paths[3]))
    changed = set(_npz_files(teacher.cache_root)) ^ set(files)
    assert changed == {cache.entry(key)["file"], next(f for f in files if f.startswith("color_3.jpg"))}

    assert teacher.run(overwrite=True, progress=False).written == 6


def test_changed_teacher_info_invalidates_all_entries(tmp_path):
    info, teacher, _ = _taught(tmp_path)
    assert SyntheticTeacher(info.root, noise=0.05).run(progress=False).written == 0
    stats = SyntheticTeacher(info.root, noise=0.1).run(progress=False)
    assert (stats.written, stats.skipped) == (6, 0)
    cache = TeacherCache(teacher.cache_root)
    assert cache.teacher_info["noise"] == 0.1 and len(_npz_files(cache.root)) == 6  # old files deleted


def test_class_embedding_is_deterministic_across_calls_and_processes():
    a = class_embedding("chair")
    assert a.shape == (512,) and a.dtype == torch.float32
    assert torch.equal(a, class_embedding("chair")) and abs(float(a.norm()) - 1) < 1e-6
    assert torch.equal(a, class_embedding("Chair")) and torch.equal(a, class_embedding("  CHAIR "))  # normalised
    assert not torch.allclose(a, class_embedding("chairs"))
    assert class_embedding("chair", dim=8).shape == (8,)
    code = ("from qrender_ns.teachers.synthetic import class_embedding; "
            "print(class_embedding('chair').double().tolist())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parents[1])
    assert torch.equal(torch.tensor(json.loads(out.stdout)).float(), a)


def test_synthetic_masks_are_the_ground_truth_instances(taught):
    info, teacher, cache = taught
    assert cache.keys() == sorted(image_key(p, info.root) for p in info.image_paths)
    for image_path, gt_path in zip(info.image_paths, info.instance_map_paths):
        gt = cv2.imread(str(gt_path), cv2.IMREAD_UNCHANGED).astype(np.int64)
        mask_ids, embeddings = cache.read(image_key(image_path, info.root))
        mask_ids = mask_ids.numpy()
        instances = [i for i in np.unique(gt) if i != 0]
        assert embeddings.shape == (len(instances), 512) and mask_ids.shape == gt.shape
        assert np.array_equal(mask_ids == -1, gt == 0)
        for m, instance in enumerate(instances):  # remap = rank among the visible instance ids
            assert np.array_equal(mask_ids == m, gt == instance)
        assert {info.classes[info.instance_classes[i]] for i in instances} >= {"wall", "floor"}


def _embeddings_by_class(info, teacher, cache):
    rows = []  # (class name, image key, embedding)
    for key in cache.keys():
        _, instance_ids = teacher.masks(key)
        _, embeddings = cache.read(key)
        rows += [(teacher.instance_class[int(i)], key, e) for i, e in zip(instance_ids, embeddings)]
    return rows


def test_embeddings_cluster_by_class(taught):
    rows = _embeddings_by_class(*taught)
    same, different = [], []
    for (c1, k1, e1), (c2, k2, e2) in combinations(rows, 2):
        cosine = float(e1 @ e2)
        if c1 == c2 and k1 != k2:
            same.append(cosine)
        elif c1 != c2:
            different.append(cosine)
    assert same and different
    assert min(same) > 0.95 and max(different) < 0.3


def test_text_encoder_returns_the_class_vectors(taught):
    info, teacher, cache = taught
    for source in (cache.root, cache.root / "manifest.json", cache):
        encoder = load_text_encoder(source)
        assert isinstance(encoder, SyntheticTextEncoder) and encoder.dim == 512 and encoder.name == "synthetic"
    names = cache.class_names
    vectors = encoder.encode(names)
    assert vectors.shape == (len(names), 512)
    assert torch.equal(vectors, torch.stack([class_embedding(n) for n in names]))
    for class_name, _, embedding in _embeddings_by_class(*taught):
        scores = vectors @ embedding
        assert names[int(scores.argmax())] == class_name and float(scores.max()) > 0.95
    unknown = encoder.encode(["zebra"])
    assert torch.equal(unknown, encoder.encode(["zebra"])) and float((vectors @ unknown[0]).abs().max()) < 0.3
    assert encoder.encode([]).shape == (0, 512)


def test_unknown_teacher_has_no_text_encoder(tmp_path):
    root = tmp_path / "cache"
    TeacherCache.create(root, {"name": "clip-gsam2"}, feature_dim=512)
    with pytest.raises(NotImplementedError, match="clip-gsam2.*CLIP teacher .*not installed"):
        load_text_encoder(root)


def test_label_noise_renames_furniture_in_every_view(tmp_path):
    info = _scene(tmp_path)
    exact, noisy = SyntheticTeacher(info.root), SyntheticTeacher(info.root, label_noise=0.6)
    assert exact.instance_class == exact.true_instance_class
    assert noisy.instance_class == SyntheticTeacher(info.root, label_noise=0.6).instance_class  # seeded, repeats
    renamed = {i: c for i, c in noisy.instance_class.items() if c != noisy.true_instance_class[i]}
    assert renamed, "no instance of this room was renamed at label_noise 0.6"
    for i, named in renamed.items():  # furniture only, always to another furniture class
        assert noisy.true_instance_class[i] in sg.FURNITURE_CLASSES and named in sg.FURNITURE_CLASSES
    vectors = torch.stack([class_embedding(n) for n in noisy.class_names])
    for key in noisy.image_keys:  # same masks; each embedding is the named class's, in every view
        mask_ids, instance_ids = noisy.masks(key)
        exact_ids, exact_instances = exact.masks(key)
        assert np.array_equal(mask_ids, exact_ids) and np.array_equal(instance_ids, exact_instances)
        scores = noisy.embeddings(key, instance_ids) @ vectors.T
        assert [noisy.class_names[int(j)] for j in scores.argmax(1)] == [noisy.instance_class[int(i)]
                                                                        for i in instance_ids]
    # the rate and the spread over the other classes, over many instance ids
    named = [noisy._named_class(i, "chair") for i in range(1, 3001)]
    assert abs(np.mean([n != "chair" for n in named]) - 0.6) < 0.03
    others = [n for n in named if n != "chair"]
    assert set(others) == set(sg.FURNITURE_CLASSES) - {"chair"}
    assert max(others.count(c) for c in set(others)) < 1.3 * len(others) / len(set(others))
    assert all(noisy._named_class(i, "wall") == "wall" for i in range(1, 200))


def test_miss_rate_drops_masks_per_view(tmp_path):
    info = _scene(tmp_path)
    exact, noisy = SyntheticTeacher(info.root), SyntheticTeacher(info.root, miss_rate=0.3)
    dropped = total = 0
    for key in noisy.image_keys:
        mask_ids, instance_ids = noisy.masks(key)
        exact_ids, exact_instances = exact.masks(key)
        assert set(instance_ids.tolist()) <= set(exact_instances.tolist())
        kept = np.isin(exact_instances, instance_ids)
        dropped, total = dropped + int((~kept).sum()), total + len(exact_instances)
        assert np.array_equal(np.unique(mask_ids[mask_ids >= 0]), np.arange(len(instance_ids)))  # renumbered
        for m, instance in enumerate(instance_ids):  # kept masks are unchanged, dropped ones are no surface
            assert np.array_equal(mask_ids == m, exact_ids == int(np.flatnonzero(exact_instances == instance)[0]))
        assert np.all(mask_ids[np.isin(exact_ids, np.flatnonzero(~kept))] == -1)
        served_ids, embeddings = noisy.compute(key)
        assert embeddings.shape == (len(instance_ids), 512) and np.array_equal(served_ids, mask_ids)
    assert 0 < dropped < total
    assert abs(np.mean([noisy._missed("images/a.jpg", i) for i in range(3000)]) - 0.3) < 0.03


def test_teacher_noise_is_recorded_and_checked(tmp_path):
    from qrender_ns.teachers.settings import SYNTHETIC, TeacherSettings, TeacherSetupError, resolve_teacher
    from qrender_ns.teachers.setup import build_teacher

    info = _scene(tmp_path)
    assert not {"label_noise", "miss_rate"} & set(SyntheticTeacher(info.root).teacher_info)  # old caches stay valid
    noisy = build_teacher(TeacherSettings(synthetic_label_noise=0.2, synthetic_miss_rate=0.1), SYNTHETIC, info.root)
    assert noisy.teacher_info["label_noise"] == 0.2 and noisy.teacher_info["miss_rate"] == 0.1
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="label_noise must be a probability in \\[0, 1\\)"):
            SyntheticTeacher(info.root, label_noise=bad)
        with pytest.raises(TeacherSetupError, match="miss_rate must be .*--synthetic-miss-rate"):
            build_teacher(TeacherSettings(synthetic_miss_rate=bad), SYNTHETIC, info.root)
    with pytest.raises(TeacherSetupError, match="--synthetic-label-noise is not read by the grounded-sam2-clip"):
        resolve_teacher(TeacherSettings(teacher="grounded-sam2-clip", synthetic_label_noise=0.2), info.root)
    ExtractFeatures(data=info.root, synthetic_label_noise=0.2).main()
    assert TeacherCache(default_cache_root(info.root, "synthetic")).teacher_info["label_noise"] == 0.2


def _real_layout(tmp_path, name="real", labels=False) -> Path:
    """A generated nerfstudio-layout scene made to look like a user's capture: no gt/ (not a generated scene) and,
    unless labels, no LeRF-OVS label/ folder (no vocabulary known before training)."""
    import shutil

    info = sg.generate_scene(tmp_path / name, layout="nerfstudio", seed=0, **SMALL)
    shutil.rmtree(info.root / "gt")
    if not labels:
        shutil.rmtree(info.root / "label", ignore_errors=True)
    return info.root


def test_auto_picks_the_prompt_free_teacher_when_no_prompts_are_known(tmp_path):
    """teacher auto: synthetic on generated scenes; on real ones grounded-sam2-clip when prompts are known (given, a
    LeRF-OVS label folder, ScanNet's classes), else sam2-auto-clip; options of another teacher are one-line errors."""
    from qrender_ns.teachers.settings import TeacherSettings, TeacherSetupError, resolve_prompts, resolve_teacher
    from qrender_ns.teachers.setup import existing_cache_root

    real, labelled, generated = _real_layout(tmp_path), _real_layout(tmp_path, "lerf", labels=True), _scene(tmp_path)
    auto = TeacherSettings()
    assert resolve_teacher(auto, real, layout="nerfstudio") == "sam2-auto-clip"
    assert resolve_teacher(TeacherSettings(teacher_weights="random-tiny"), real, layout="nerfstudio") == "sam2-auto-clip"
    assert resolve_teacher(TeacherSettings(mask_level="all"), real, layout="nerfstudio") == "sam2-auto-clip"
    assert resolve_teacher(TeacherSettings(prompts="chair"), real, layout="nerfstudio") == "grounded-sam2-clip"
    assert resolve_teacher(auto, labelled, layout="nerfstudio") == "grounded-sam2-clip"  # LeRF-OVS categories
    assert resolve_teacher(auto, real, layout="scannet") == "grounded-sam2-clip"  # the ScanNet-19 classes
    assert resolve_teacher(auto, generated.root, layout="scannet") == "synthetic"
    assert resolve_teacher(TeacherSettings(teacher_weights="random-tiny"), generated.root) == "grounded-sam2-clip"

    errors = [
        (TeacherSettings(prompts="chair", mask_level="large"), "--prompts \(grounded-sam2-clip\) and --mask-level"),
        (TeacherSettings(teacher="grounded-sam2-clip", mask_level="small"), "--mask-level is not read by the grounded"),
        (TeacherSettings(teacher="sam2-auto-clip", prompts="chair"), "--prompts is not read by the sam2-auto-clip"),
        (TeacherSettings(teacher="synthetic", mask_level="small"), "--mask-level is not read by the synthetic"),
    ]
    for settings, message in errors:
        with pytest.raises(TeacherSetupError, match=message) as err:
            resolve_teacher(settings, real, layout="nerfstudio")
        assert "\n" not in str(err.value)
    with pytest.raises(TeacherSetupError, match="needs text prompts.*prompt-free sam2-auto-clip teacher") as err:
        resolve_prompts(TeacherSettings(teacher="grounded-sam2-clip"), real, "nerfstudio", "--pipeline.datamanager.")
    assert "--pipeline.datamanager.prompts" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(TeacherSetupError, match="cannot read the prompts file .*nowhere.txt"):
        resolve_prompts(TeacherSettings(prompts_file=tmp_path / "nowhere.txt"), real, "nerfstudio")

    # A finished run's saved config says auto: its cache is found without any weights, the one auto picks first.
    assert existing_cache_root(auto, real) is None
    for name in ("grounded-sam2-clip", "sam2-auto-clip"):
        (real / "qsplat_teacher" / name).mkdir(parents=True)
        (real / "qsplat_teacher" / name / "manifest.json").write_text("{}")
    assert existing_cache_root(auto, real) == real / "qsplat_teacher" / "sam2-auto-clip"
    assert existing_cache_root(TeacherSettings(prompts="chair"), real) == real / "qsplat_teacher" / "grounded-sam2-clip"


def test_nerfstudio_dataparser_filenames_map_to_cache_keys(tmp_path):
    info = _scene(tmp_path, layout="nerfstudio", seed=1)
    SyntheticTeacher(info.root).run(progress=False)
    cache = TeacherCache(default_cache_root(info.root, "synthetic"))
    outputs = sg.nerfstudio_parser_config(info.root).setup().get_dataparser_outputs("train")
    keys = [image_key(f, info.root) for f in outputs.image_filenames]
    assert keys and all(k.startswith("images/frame_") for k in keys)
    cache.validate(keys, sizes=[(48, 64)] * len(keys))


# --- command line ---------------------------------------------------------------------------------------


def test_extract_features_command(tmp_path, capsys):
    import tyro

    info = _scene(tmp_path)
    command = tyro.cli(ExtractFeatures, args=["--data", str(info.root)])
    assert command.teacher == "auto" and command.synthetic_noise is None and not command.overwrite
    command.main()
    out = capsys.readouterr().out
    from qrender_ns.data.dataparser import QSplatDataParserConfig

    train = QSplatDataParserConfig(data=info.root).setup().get_dataparser_outputs("train").image_filenames
    assert str(default_cache_root(info.root, "synthetic")) in out and f"{len(train)} images written" in out
    command.main()
    assert "0 images written" in capsys.readouterr().out

    with pytest.raises(SystemExit, match="not a scene layout q-splat reads"):
        ExtractFeatures(data=tmp_path).main()


# --- caches are never silently replaced -------------------------------------------------------------------


def test_cache_of_another_teacher_setting_or_other_images_is_kept(tmp_path):
    from types import SimpleNamespace

    from qrender_ns.teachers.filling import open_cache_for
    from qrender_ns.teachers.settings import TeacherSetupError

    root = tmp_path / "scene" / "qsplat_teacher" / "grounded-sam2-clip"
    old = SimpleNamespace(name="grounded-sam2-clip", cache_root=root, dim=4, class_names=["chair"],
                          teacher_info={"name": "grounded-sam2-clip", "prompts": ["chair"]})
    cache = open_cache_for(old, ["images/a.png"])
    cache.write("images/a.png", np.zeros((2, 3), np.int32), np.ones((1, 4)), "sha-a")
    cache.close()
    new = SimpleNamespace(**{**vars(old), "teacher_info": {"name": "grounded-sam2-clip", "prompts": ["table"]},
                             "class_names": ["table"]})
    with pytest.raises(TeacherSetupError, match=r"other settings \(differ: prompts\).*kept as it is.*--overwrite"):
        open_cache_for(new, ["images/a.png"])
    with pytest.raises(TeacherSetupError, match="none of which is an image of this scene"):
        open_cache_for(old, ["images/b.png"])
    assert TeacherCache(root).keys() == ["images/a.png"]  # nothing lost
    assert len(open_cache_for(new, ["images/a.png"], replace_other_teacher=True)) == 0  # --overwrite replaces
