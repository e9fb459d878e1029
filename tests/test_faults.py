"""Faults and bad input (issue 15, points 6-11, 13): cache writer lock and file modes, rasterizer input checks,
unknown CLI verbs, LangSplat's relevancy at zero features. Small and CPU-only."""

import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from qrender_ns.teachers import cache as cache_module
from qrender_ns.teachers.cache import TeacherCache, TeacherCacheError

INFO = {"name": "unit-test", "model": "none"}
DIM = 8
REPO = Path(__file__).resolve().parents[1]


def _entry(seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(-1, 3, size=(4, 5)).astype(np.int32), rng.normal(size=(3, DIM)).astype(np.float32)


# ---------------------------------------------------------------------------------------- 6: one writer
def test_second_writer_is_refused_and_keeps_the_first_writers_files(tmp_path):
    root = tmp_path / "cache"
    first = TeacherCache.create(root, INFO, feature_dim=DIM)
    first.write("color/0.jpg", *_entry(), "a")
    in_flight = root / ".color_1.jpg-0123456789ab.npz.feedc0de.tmp"  # the first writer's temp file, mid-write
    in_flight.write_bytes(b"half")
    with pytest.raises(cache_module.CacheBusyError, match="being written by pid .*one writer at a time"):
        TeacherCache.create(root, INFO, feature_dim=DIM)
    assert in_flight.exists(), "the refused writer's start-up clean-up deleted another writer's temp file"
    first.write("color/1.jpg", *_entry(1), "b")  # the first writer goes on undisturbed
    assert TeacherCache(root).keys() == ["color/0.jpg", "color/1.jpg"]
    first.close()
    with TeacherCache.create(root, INFO, feature_dim=DIM) as second:  # free again: clean-up runs now
        assert not in_flight.exists() and second.keys() == ["color/0.jpg", "color/1.jpg"]


def test_a_training_waits_for_another_writer_of_its_teacher_cache(tmp_path, capsys):
    """Two ns-train of one scene started at once: the second waits for the first's cache writes (it used to
    crash with CacheBusyError at datamanager set-up)."""
    import threading
    from types import SimpleNamespace

    from qrender_ns.method.datamanager import QSplatDataManager

    root = tmp_path / "cache"
    first = TeacherCache.create(root, INFO, feature_dim=DIM)
    teacher = SimpleNamespace(cache_root=root, teacher_info=INFO, dim=DIM, class_names=[], name="synthetic")
    got = {}
    waiter = threading.Thread(target=lambda: got.setdefault("w", QSplatDataManager._open_cache_when_free(
        teacher, ["color/0.jpg"])))
    waiter.start()
    waiter.join(0.5)
    assert waiter.is_alive() and "w" not in got  # still waiting
    first.write("color/0.jpg", *_entry(), "a")
    first.close()
    waiter.join(10)
    assert not waiter.is_alive()
    with got["w"] as second:
        assert second.keys() == ["color/0.jpg"]  # the first writer's image is kept
    assert "being written by pid" in capsys.readouterr().out


def test_lock_is_released_when_the_writer_process_dies(tmp_path):
    root = tmp_path / "cache"
    code = ("import os, sys; from qrender_ns.teachers.cache import TeacherCache; "
            f"c = TeacherCache.create({str(root)!r}, {INFO!r}, feature_dim={DIM}); print('ready', flush=True); "
            "sys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert proc.stdout.readline().strip() == "ready"
        with pytest.raises(cache_module.CacheBusyError, match=f"pid {proc.pid}"):
            TeacherCache.create(root, INFO, feature_dim=DIM)
    finally:
        proc.kill()  # kill -9: no clean-up runs, the kernel drops the flock
        proc.wait()
    TeacherCache.create(root, INFO, feature_dim=DIM).close()


def test_reader_cannot_write(tmp_path):
    root = tmp_path / "cache"
    TeacherCache.create(root, INFO, feature_dim=DIM).close()
    with pytest.raises(TeacherCacheError, match="TeacherCache.create"):
        TeacherCache(root).write("color/0.jpg", *_entry(), "a")


# ---------------------------------------------------------------------------------------- 10: umask
def test_cache_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        with TeacherCache.create(tmp_path / "cache", INFO, feature_dim=DIM) as cache:
            cache.write("color/0.jpg", *_entry(), "a")
            files = [cache.root / "manifest.json", cache.root / cache.entry("color/0.jpg")["file"]]
    finally:
        os.umask(old)
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, f"{path.name}: {oct(path.stat().st_mode)}"


def test_read_only_cache_folder_is_a_sentence(tmp_path, monkeypatch):
    import errno

    root = tmp_path / "cache"
    TeacherCache.create(root, INFO, feature_dim=DIM).close()
    (root / cache_module.LOCK_NAME).unlink()
    if os.geteuid() == 0:  # root ignores permissions: make the folder's file creation fail as a read-only one
        real_open = os.open

        def read_only(path, flags, *args, **kwargs):
            if Path(path).parent == root and flags & os.O_CREAT:
                raise OSError(errno.EROFS, "Read-only file system", str(path))
            return real_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(os, "open", read_only)
    root.chmod(0o555)
    try:
        with pytest.raises(TeacherCacheError, match="is not writable"):
            TeacherCache.create(root, INFO, feature_dim=DIM)
    finally:
        root.chmod(0o755)


def test_disk_full_is_a_sentence(tmp_path, monkeypatch):
    import errno

    with TeacherCache.create(tmp_path / "cache", INFO, feature_dim=DIM) as cache:
        real_fsync = os.fsync

        def full(fd):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, "fsync", full)
        with pytest.raises(TeacherCacheError, match="disk .* is full"):
            cache.write("color/0.jpg", *_entry(), "a")
        monkeypatch.setattr(os, "fsync", real_fsync)
        assert [p.name for p in cache.root.iterdir() if p.name.endswith(".tmp")] == []


# ---------------------------------------------------------------------------------------- 8, 9: rasterizer
def _binned(num_gs=3, dtype=torch.float32):
    from qrender_ns.render.binning import isect_offset_encode, isect_tiles

    means2d = torch.tensor([[[4.0, 4.0], [8.0, 8.0], [12.0, 4.0]]], dtype=dtype)[:, :num_gs]
    conics = torch.tensor([0.2, 0.0, 0.2], dtype=dtype).expand(1, num_gs, 3).contiguous()
    radii = torch.full((1, num_gs), 5, dtype=torch.int32)
    depths = torch.arange(1, num_gs + 1, dtype=dtype)[None]
    keys, ids = isect_tiles(means2d.float(), radii, depths.float(), 16, 1, 1)
    offsets = isect_offset_encode(keys, 1, 1, 1)
    return means2d, conics, offsets, ids


@pytest.mark.parametrize("bad", [1.5, -0.1])
def test_rasterize_to_pixels_rejects_opacities_outside_0_1(bad):
    from qrender_ns.render import rasterize_to_pixels

    means2d, conics, offsets, ids = _binned()
    features = torch.ones(3, 2)
    opacities = torch.tensor([[0.5, bad, 0.5]])
    with pytest.raises(ValueError, match=r"`opacities` must lie in \[0, 1\]"):
        rasterize_to_pixels(means2d, conics, features, opacities, 16, 16, 16, offsets, ids, backend="torch")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rasterizers_reject_half_precision_with_a_valueerror(dtype):
    from qrender_ns.render import rasterize_features, rasterize_to_pixels

    means2d, conics, offsets, ids = _binned(dtype=dtype)
    with pytest.raises(ValueError, match="float32 or float64.*cast with .float()"):
        rasterize_to_pixels(means2d, conics, torch.ones(3, 2, dtype=dtype), torch.full((1, 3), 0.5, dtype=dtype),
                            16, 16, 16, offsets, ids, backend="cpu")
    n = 2
    args = (torch.zeros(n, 3), torch.tensor([[1.0, 0, 0, 0]] * n), torch.full((n, 3), 0.1), torch.full((n,), 0.5),
            torch.ones(n, 4), torch.eye(4)[None], torch.eye(3)[None], 8, 8)
    bad = [a.to(dtype) if isinstance(a, torch.Tensor) and i == 4 else a for i, a in enumerate(args)]
    with pytest.raises(ValueError, match="`features` must be a float32 or float64"):
        rasterize_features(*bad, backend="cpu")


# ---------------------------------------------------------------------------------------- 11: CLI verbs
def _qsplat(*args):
    return subprocess.run([sys.executable, "-m", "qrender_ns.cli", *args], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)


def test_unknown_verb_exits_non_zero(capsys):
    from qrender_ns.cli import check_verb

    with pytest.raises(SystemExit) as exit_info:
        check_verb(["reprot", "--help"])
    assert exit_info.value.code == 2
    assert "unknown command 'reprot'. Did you mean 'report'" in capsys.readouterr().err
    check_verb(["report", "--help"])  # known verbs and options pass
    check_verb(["--help"])
    result = _qsplat("no-such-verb", "--help")
    assert result.returncode == 2 and "unknown command 'no-such-verb'" in result.stderr


# ---------------------------------------------------------------------------------------- 13: relevancy
def _langsplat_relevancy(embed, pos, negs):
    """LangSplat eval/openclip_encoder.py get_relevancy, verbatim (embed used as given, not normalised)."""
    phrases = torch.cat([pos[None], negs], dim=0)
    output = torch.mm(embed, phrases.T)
    positive_vals = output[..., 0:1]
    negative_vals = output[..., 1:]
    repeated_pos = positive_vals.repeat(1, len(negs))
    sims = torch.stack((repeated_pos, negative_vals), dim=-1)
    softmax = torch.softmax(10 * sims, dim=-1)
    best_id = softmax[..., 0].argmin(dim=1)
    return torch.gather(softmax, 1, best_id[..., None, None].expand(best_id.shape[0], len(negs), 2))[:, 0, 0]


def test_relevancy_matches_langsplat_including_zero_features():
    from qrender_ns.features.relevancy import relevancy

    gen = torch.Generator().manual_seed(0)
    unit = lambda x: torch.nn.functional.normalize(x, dim=-1)  # noqa: E731
    pos, negs = unit(torch.randn(16, generator=gen)), unit(torch.randn(4, 16, generator=gen))
    feats = unit(torch.randn(10, 16, generator=gen))
    feats[[2, 7]] = 0.0  # pixels nothing was rendered at
    ours = relevancy(feats, pos, negs)
    theirs = _langsplat_relevancy(feats, pos, negs)
    torch.testing.assert_close(ours, theirs)
    assert torch.allclose(ours[[2, 7]], torch.tensor(0.5))


# ---------------------------------------------------------------------------------------- 7: checkpoints
def _good_and_truncated(ckpt_dir: Path):
    ckpt_dir.mkdir(parents=True)
    torch.save({"step": 100, "pipeline": {"w": torch.ones(3)}}, ckpt_dir / "step-000000100.ckpt")
    full = ckpt_dir / "full.tmp"
    torch.save({"step": 200, "pipeline": {"w": torch.zeros(1000)}}, full)
    (ckpt_dir / "step-000000200.ckpt").write_bytes(full.read_bytes()[: full.stat().st_size // 2])  # kill -9
    full.unlink()


class _Pipeline:
    def __init__(self):
        self.loaded = None

    def load_pipeline(self, state, step):
        self.loaded = (step, state)


def test_eval_skips_a_truncated_latest_checkpoint_naming_it(tmp_path, capfd):
    from types import SimpleNamespace

    from nerfstudio.utils import eval_utils

    from qrender_ns.method import checkpoint

    ckpt_dir = tmp_path / "run" / "nerfstudio_models"
    _good_and_truncated(ckpt_dir)
    checkpoint.install_eval_fallback()
    pipeline = _Pipeline()
    config = SimpleNamespace(method_name="q-splat", load_dir=ckpt_dir, load_step=None)
    path, step = eval_utils.eval_load_checkpoint(config, pipeline)
    assert (path.name, step, pipeline.loaded[0]) == ("step-000000100.ckpt", 100, 100)
    err = capfd.readouterr().err
    assert "skipping checkpoint" in err and "step-000000200.ckpt" in err and "using step 100" in err
    (ckpt_dir / "step-000000100.ckpt").write_bytes(b"garbage")
    with pytest.raises(SystemExit, match="no usable checkpoint .*all 2 step-\\*.ckpt files are unreadable"):
        eval_utils.eval_load_checkpoint(config, pipeline)
    other = SimpleNamespace(method_name="splatfacto", load_dir=ckpt_dir, load_step=None)
    with pytest.raises(Exception):  # other methods: nerfstudio's own behaviour, untouched
        eval_utils.eval_load_checkpoint(other, pipeline)


def test_checkpoint_save_is_atomic(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from qrender_ns.method.trainer import QSplatTrainer

    ckpt_dir = tmp_path / "run" / "nerfstudio_models"
    fake = SimpleNamespace(checkpoint_dir=ckpt_dir, pipeline=torch.nn.Linear(2, 2),
                           optimizers=SimpleNamespace(optimizers={}, schedulers={}),
                           grad_scaler=torch.amp.GradScaler("cpu", enabled=False),
                           config=SimpleNamespace(save_only_latest_checkpoint=True))
    QSplatTrainer.save_checkpoint(fake, 10)
    assert [p.name for p in ckpt_dir.iterdir()] == ["step-000000010.ckpt"]
    real_save = torch.save

    def killed_mid_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt  # what the process sees last before dying

    monkeypatch.setattr(torch, "save", killed_mid_save)
    with pytest.raises(KeyboardInterrupt):
        QSplatTrainer.save_checkpoint(fake, 20)
    monkeypatch.setattr(torch, "save", real_save)
    assert [p.name for p in ckpt_dir.iterdir()] == ["step-000000010.ckpt"]  # no truncated step-20 file
    assert torch.load(ckpt_dir / "step-000000010.ckpt", weights_only=False)["step"] == 10
    (ckpt_dir.parent / ".step-000000020.ckpt.deadbeef.partial").write_bytes(b"left by a kill -9")
    QSplatTrainer.save_checkpoint(fake, 30)
    assert [p.name for p in ckpt_dir.iterdir()] == ["step-000000030.ckpt"]
    assert not list(ckpt_dir.parent.glob("*.partial"))


def test_resume_picks_the_newest_complete_checkpoint(tmp_path, capfd):
    from qrender_ns.method import checkpoint

    ckpt_dir = tmp_path / "run" / "nerfstudio_models"
    _good_and_truncated(ckpt_dir)
    step, path, _ = checkpoint.latest_loadable_step(ckpt_dir)
    assert (step, path.name) == (100, "step-000000100.ckpt")
    assert "skipping checkpoint" in capfd.readouterr().err
    with pytest.raises(SystemExit, match="no checkpoint folder"):
        checkpoint.latest_loadable_step(tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------- 9: run configs
def test_load_config_sentences(tmp_path):
    from qrender_ns.method.checkpoint import check_run_config, check_output_path, ns_eval_output_path

    with pytest.raises(SystemExit, match="does not exist"):
        check_run_config(tmp_path / "missing.yml")
    bad = tmp_path / "bad.yml"
    bad.write_text("method_name: [unclosed\n")
    with pytest.raises(SystemExit, match="not valid YAML"):
        check_run_config(bad)
    other = tmp_path / "splatfacto.yml"
    other.write_text("!!python/object:nerfstudio.engine.trainer.TrainerConfig\nmethod_name: splatfacto\n")
    with pytest.raises(SystemExit, match="is a 'splatfacto' run; this command reads q-splat runs"):
        check_run_config(other)
    plain = tmp_path / "plain.yml"
    plain.write_text("a: 1\n")
    with pytest.raises(SystemExit, match="not a nerfstudio run config"):
        check_run_config(plain)

    assert ns_eval_output_path(["/venv/bin/ns-eval", "--load-config", "c.yml", "--output-path", "m.json"]) == Path("m.json")
    assert ns_eval_output_path(["/venv/bin/ns-eval", "--output-path=x/m.json"]) == Path("x/m.json")
    assert ns_eval_output_path(["/venv/bin/ns-eval"]) == Path("output.json")
    assert ns_eval_output_path(["/venv/bin/ns-train", "--output-path", "m.json"]) is None
    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(SystemExit, match="cannot write --output-path"):
        check_output_path(afile / "metrics.json")
    with pytest.raises(SystemExit, match="must end in .json"):
        check_output_path(tmp_path / "metrics.txt")
    check_output_path(tmp_path / "new" / "metrics.json")
    assert list((tmp_path / "new").iterdir()) == []


def test_nerfstudio_commands_get_a_sentence_for_a_missing_or_broken_load_config(tmp_path):
    """ns-eval / ns-viewer / ns-render / ns-export read --load-config before any q-splat code of the run: the
    plugin, imported while nerfstudio discovers methods, checks the file first (any method's run)."""
    from qrender_ns.method.checkpoint import check_ns_command_line, ns_load_config

    assert ns_load_config(["/v/bin/ns-eval", "--load-config", "a.yml"]) == ("ns-eval", Path("a.yml"))
    assert ns_load_config(["/v/bin/ns-render", "camera-path", "--load-config=b.yml"]) == ("ns-render", Path("b.yml"))
    assert ns_load_config(["/v/bin/ns-train", "--load-config", "a.yml"]) is None
    assert ns_load_config(["/v/bin/ns-eval"]) is None
    bad = tmp_path / "bad.yml"
    bad.write_text("method_name: [unclosed\n")
    with pytest.raises(SystemExit, match="ns-viewer: --load-config .*bad.yml is not valid YAML"):
        check_ns_command_line(["ns-viewer", "--load-config", str(bad)])
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yml").write_text("!!python/object:nerfstudio.engine.trainer.TrainerConfig\nmethod_name: splatfacto\n")
    with pytest.raises(SystemExit, match=r"is a folder \(did you mean .*config.yml\?\)"):
        check_ns_command_line(["ns-export", "gaussian-splat", "--load-config", str(run)])
    check_ns_command_line(["ns-eval", "--load-config", str(run / "config.yml")])  # another method's run passes

    ns_eval = Path(sys.executable).parent / "ns-eval"
    result = subprocess.run([str(ns_eval), "--load-config", str(tmp_path / "missing.yml")], capture_output=True,
                            text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode != 0
    assert "ns-eval: --load-config" in result.stderr and "does not exist" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


# ---------------------------------------------------------------------------------------- 9: read-only, disk full
def _fail_writes_under(monkeypatch, folder: Path, err_no: int):
    """Make creating files under `folder` fail as a read-only file system / full disk would (root ignores
    permissions, so chmod alone cannot test this here)."""
    import builtins

    real_open = builtins.open

    def failing_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wxa") and Path(file).resolve().is_relative_to(folder.resolve()):
            raise OSError(err_no, os.strerror(err_no), str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", failing_open)


def test_eval_outputs_and_run_folder_write_errors_are_sentences(tmp_path, monkeypatch):
    import errno

    from qrender_ns.eval import write_json
    from qrender_ns.utils.fsio import check_writable_dir

    out = tmp_path / "ro"
    out.mkdir()
    _fail_writes_under(monkeypatch, out, errno.EROFS)
    with pytest.raises(SystemExit, match=r"cannot write .*ro/result.json: .*ro is not writable.*--output"):
        write_json(out / "result.json", {"a": 1})
    with pytest.raises(SystemExit, match="is not writable.*--output-dir"):
        check_writable_dir(out / "run", "pass a writable --output-dir")
    monkeypatch.undo()
    _fail_writes_under(monkeypatch, out, errno.ENOSPC)
    with pytest.raises(SystemExit, match="disk holding .* is full"):
        write_json(out / "result.json", {"a": 1})
    monkeypatch.undo()
    write_json(out / "result.json", {"a": 1})
    assert sorted(p.name for p in out.iterdir()) == ["result.json", "run"]  # no temp file left


def test_full_disk_during_checkpoint_save_is_a_sentence(tmp_path, monkeypatch):
    import errno
    from types import SimpleNamespace

    from qrender_ns.method.trainer import QSplatTrainer

    ckpt_dir = tmp_path / "run" / "nerfstudio_models"
    fake = SimpleNamespace(checkpoint_dir=ckpt_dir, pipeline=torch.nn.Linear(2, 2),
                           optimizers=SimpleNamespace(optimizers={}, schedulers={}),
                           grad_scaler=torch.amp.GradScaler("cpu", enabled=False),
                           config=SimpleNamespace(save_only_latest_checkpoint=False))
    QSplatTrainer.save_checkpoint(fake, 1)
    _fail_writes_under(monkeypatch, tmp_path / "run", errno.ENOSPC)
    with pytest.raises(SystemExit, match="disk holding .* is full.*previous checkpoints are intact"):
        QSplatTrainer.save_checkpoint(fake, 2)
    monkeypatch.undo()
    assert [p.name for p in ckpt_dir.iterdir()] == ["step-000000001.ckpt"]
