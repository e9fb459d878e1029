"""`qsplat make-dataset`: many generated rooms, each with its teacher cache and fitted 3DGS, for GS-Net.

    qsplat make-dataset --out data/rooms --scenes 32 --val-scenes 8 --seed 0 [--fits plain depth] [--jobs 2]

Layout of the dataset folder D::

    D/dataset.json                 settings, per-scene timings, fit PSNR, summary
    D/splits.json                  {"train": [scene names], "val": [...], "runs": {fit: {"train": [config.yml], ...}}}
    D/scene_000/                   a generated room (scene_generator, SceneVariation), its ground truth
    D/scene_000/qsplat_teacher/synthetic/    its synthetic teacher cache
    D/scene_000/fit-plain/q-splat/plain/config.yml   a short `ns-train q-splat` RGB fit (nerfstudio run)
    D/scene_000/stages/{generate,teacher,fit-plain}.json   written last, atomically, once a stage is complete

Scene i has seed `seed * 1000 + i`; the last `val_scenes` scenes are the validation split. Resumable: a
stage whose marker exists (with the same settings) is skipped; an unfinished one (no marker: killed, or it
failed) is removed and redone from scratch, and so is every later stage of that scene. Settings that
change what a scene holds (size, views, variation, fit steps...) cannot change under an existing dataset:
the command stops and names them.

The fit is RGB only (the feature loss never starts: `feature_warmup_steps` past the last step); `plain`
fits run with depth supervision off, `depth` fits with `--pipeline.model.depth-loss on` (when this q-splat
has that option). Kept free of torch at import time (the CLI imports it).
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import queue as queue_mod
import shutil
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import fields
from multiprocessing.managers import SyncManager
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
from nerfstudio.engine.callbacks import TrainingCallbackLocation
from nerfstudio.utils.rich_utils import CONSOLE

from qrender_ns.data.scene_generator import STRUCTURE_CLASSES, SceneVariation, eval_split, generate_scene
from qrender_ns.method.config import qsplat_trainer_config
from qrender_ns.method.model import QSplatModelConfig
from qrender_ns.teachers.cache import default_cache_root
from qrender_ns.teachers.synthetic import SyntheticTeacher, check_probability
from qrender_ns.utils.fsio import atomic_write_json
from qrender_ns.utils.progress import OptionalProgress
from qrender_ns.workflows.options import MakeDataset

FORMAT = "qsplat-dataset/1"
SPLITS_FORMAT = "qsplat-dataset-splits/1"
FIT_KINDS = ("plain", "depth")
# What a fit kind sets on QSplatModelConfig.depth_loss (the option another change adds; see _fit_model_options)
_DEPTH_LOSS = {"plain": "off", "depth": "on"}

Progress = Callable[[str, int, int], None]  # (stage label, completed, total)


class DatasetError(ValueError):
    """Bad make-dataset settings, or settings that differ from the dataset being resumed."""


# ---------------------------------------------------------------------------------------------------
# Settings, names, markers
# ---------------------------------------------------------------------------------------------------

# Settings that decide what a scene holds; a resumed dataset must keep them.
_CONTENT_KEYS = ("seed", "layout", "width", "height", "num_images", "num_eval", "num_points", "variation",
                 "fit_steps", "depth_loss_mult")
_TEACHER_KEYS = ("synthetic_label_noise", "synthetic_miss_rate")


def scene_name(index: int) -> str:
    return f"scene_{index:03d}"


def scene_seed(dataset_seed: int, index: int) -> int:
    return dataset_seed * 1000 + index


def teacher_options(cfg: MakeDataset) -> Dict[str, float]:
    """The synthetic teacher's noise options that are on (none by default, so datasets made before they
    existed keep their settings)."""
    return {k: float(getattr(cfg, k)) for k in _TEACHER_KEYS if getattr(cfg, k)}


def content_settings(cfg: MakeDataset) -> dict:
    values = {k: getattr(cfg, k) for k in _CONTENT_KEYS}
    values["variation"] = cfg.variation.to_json()
    return {**values, **teacher_options(cfg)}


def _write_json_atomic(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, payload)


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # missing or torn: the stage counts as not done


def stage_path(scene_dir: Path, stage: str) -> Path:
    return scene_dir / "stages" / f"{stage}.json"


def fit_run_dir(scene_dir: Path, kind: str) -> Path:
    """The nerfstudio run folder of a fit: <scene>/fit-<kind>/q-splat/<kind> (config.yml, nerfstudio_models)."""
    return scene_dir / f"fit-{kind}" / "q-splat" / kind


def validate(cfg: MakeDataset) -> None:
    if cfg.scenes < 1:
        raise DatasetError(f"--scenes must be >= 1, got {cfg.scenes}")
    if not 0 <= cfg.val_scenes < cfg.scenes:
        raise DatasetError(f"--val-scenes must be in [0, scenes) so some scenes train; got {cfg.val_scenes} of "
                           f"{cfg.scenes}")
    if cfg.fit_steps < 1:
        raise DatasetError(f"--fit-steps must be >= 1, got {cfg.fit_steps}")
    if cfg.jobs < 1:
        raise DatasetError(f"--jobs must be >= 1, got {cfg.jobs}")
    if not cfg.fits:
        raise DatasetError("--fits: give at least one of plain, depth")
    if len(set(cfg.fits)) != len(cfg.fits):
        raise DatasetError(f"--fits lists a kind twice: {cfg.fits}")
    if cfg.depth_loss_mult is not None and "depth" not in cfg.fits:
        raise DatasetError("--depth-loss-mult is read by depth fits only; add depth to --fits or drop it")
    if "depth" in cfg.fits and not _model_has_depth_loss():
        raise DatasetError("--fits depth needs the q-splat option --pipeline.model.depth-loss "
                           "(QSplatModelConfig.depth_loss), which this installation does not have; use --fits plain")

    try:
        eval_split(cfg.num_images, cfg.num_eval)
    except ValueError as e:
        raise DatasetError(f"--num-images / --num-eval: {e}") from None
    if cfg.width < 8 or cfg.height < 8:
        raise DatasetError("--width and --height must be >= 8")

    for key in _TEACHER_KEYS:
        try:
            check_probability(f"--{key.replace('_', '-')}", getattr(cfg, key))
        except ValueError as e:
            raise DatasetError(str(e)) from None


def _model_has_depth_loss() -> bool:
    return any(f.name == "depth_loss" for f in fields(QSplatModelConfig))


# ---------------------------------------------------------------------------------------------------
# One scene
# ---------------------------------------------------------------------------------------------------


def _stage_done(scene_dir: Path, stage: str, settings: dict) -> Optional[dict]:
    marker = _read_json(stage_path(scene_dir, stage))
    return marker if marker is not None and marker.get("settings") == settings else None


def build_scene_stages(cfg_dict: dict, index: int, dataset_dir: str, report: Optional[Progress] = None) -> dict:
    """Every missing stage of scene `index` (generate, teacher, each fit); returns its markers. Picklable
    arguments only: --jobs runs this in worker processes."""
    cfg = _config_from_dict(cfg_dict)
    report = report or (lambda *_: None)
    name = scene_name(index)
    scene_dir = Path(dataset_dir) / name
    seed = scene_seed(cfg.seed, index)
    content = content_settings(cfg)
    markers: Dict[str, dict] = {}

    gen_settings = {k: content[k] for k in ("layout", "width", "height", "num_images", "num_eval", "num_points",
                                            "variation")}
    gen_settings["seed"] = seed
    done = _stage_done(scene_dir, "generate", gen_settings)
    redo_rest = done is None
    if done is None:
        report("generate", 0, 1)
        if scene_dir.exists():  # an unfinished scene: start it over
            shutil.rmtree(scene_dir)
        start = time.perf_counter()
        info = generate_scene(scene_dir, layout=cfg.layout, seed=seed, num_images=cfg.num_images, width=cfg.width,
                              height=cfg.height, num_eval=cfg.num_eval, num_points=cfg.num_points,
                              variation=cfg.variation)
        meta = json.loads(info.scene_json_path.read_text())
        room = meta["room"]
        objects = [i["class_name"] for i in meta["instances"] if i["class_name"] not in STRUCTURE_CLASSES]
        done = {"settings": gen_settings, "seconds": time.perf_counter() - start,
                "room": [room["half_x"], room["half_y"], room["height"]], "objects": objects,
                "camera_path": meta.get("camera_path"), "images": len(info.frame_names)}
        _write_json_atomic(stage_path(scene_dir, "generate"), done)
    markers["generate"] = done
    report("generate", 1, 1)

    teacher_settings = {"teacher": "synthetic", "scene": gen_settings, **teacher_options(cfg)}
    done = None if redo_rest else _stage_done(scene_dir, "teacher", teacher_settings)
    if done is None:
        redo_rest = True
        report("teacher", 0, 1)

        stage_path(scene_dir, "teacher").unlink(missing_ok=True)
        cache_root = default_cache_root(scene_dir, "synthetic")
        if cache_root.exists():
            shutil.rmtree(cache_root)
        start = time.perf_counter()
        with quiet_nerfstudio():
            stats = SyntheticTeacher(scene_dir, label_noise=cfg.synthetic_label_noise,
                                     miss_rate=cfg.synthetic_miss_rate).run(progress=False)
        done = {"settings": teacher_settings, "seconds": time.perf_counter() - start, "images": stats.written,
                "masks": stats.masks, "cache": str(cache_root.relative_to(scene_dir))}
        _write_json_atomic(stage_path(scene_dir, "teacher"), done)
    markers["teacher"] = done
    report("teacher", 1, 1)

    for kind in cfg.fits:
        stage = f"fit-{kind}"
        fit_settings = {"kind": kind, "steps": cfg.fit_steps, "depth_loss_mult": cfg.depth_loss_mult if kind == "depth"
                        else None, "scene": gen_settings}
        done = None if redo_rest else _stage_done(scene_dir, stage, fit_settings)
        if done is None:  # later fits do not depend on this one: redo_rest stays as it is
            stage_path(scene_dir, stage).unlink(missing_ok=True)
            if (scene_dir / stage).exists():
                shutil.rmtree(scene_dir / stage)
            result = fit_scene(scene_dir, kind, cfg.fit_steps, depth_loss_mult=cfg.depth_loss_mult,
                               device=cfg.device, report=lambda c, t, s=stage: report(s, c, t),
                               teacher=teacher_options(cfg))
            done = {"settings": fit_settings, **result,
                    "config": str((fit_run_dir(scene_dir, kind) / "config.yml").relative_to(scene_dir))}
            _write_json_atomic(stage_path(scene_dir, stage), done)
        markers[stage] = done
        report(stage, cfg.fit_steps, cfg.fit_steps)
    return markers


def _config_from_dict(d: dict) -> MakeDataset:
    d = dict(d)
    d["out"] = Path(d["out"])
    d["fits"] = tuple(d["fits"])
    var = {k: tuple(v) if isinstance(v, list) else v for k, v in d["variation"].items()}
    d["variation"] = SceneVariation(**var)
    return MakeDataset(**d)


def _config_to_dict(cfg: MakeDataset) -> dict:
    d = {f.name: getattr(cfg, f.name) for f in fields(cfg)}
    d["out"] = str(cfg.out)
    d["variation"] = cfg.variation.to_json()
    return d


# ---------------------------------------------------------------------------------------------------
# The 3DGS fit (nerfstudio's Trainer, in this process)
# ---------------------------------------------------------------------------------------------------


def _fit_model_options(kind: str, depth_loss_mult: Optional[float]) -> Dict[str, object]:
    """QSplatModelConfig fields a fit sets. depth_loss is only set when the model has it: a plain fit on a
    q-splat without that option has no depth loss anyway."""
    options: Dict[str, object] = {"num_downscales": 0}  # images are small: full resolution from the start
    if _model_has_depth_loss():
        options["depth_loss"] = _DEPTH_LOSS[kind]
        if kind == "depth" and depth_loss_mult is not None:
            options["depth_loss_mult"] = depth_loss_mult
    elif kind == "depth":
        raise DatasetError("--fits depth needs --pipeline.model.depth-loss (QSplatModelConfig.depth_loss), which "
                           "this q-splat does not have; use --fits plain")
    return options


def fit_config(scene_dir: Path, kind: str, steps: int, depth_loss_mult: Optional[float] = None,
               device: str = "auto", teacher: Optional[Dict[str, float]] = None):
    """The q-splat TrainerConfig of a fit (`ns-train q-splat --data <scene>` with the options below); its run
    folder is fit_run_dir(scene_dir, kind). `teacher`: the synthetic teacher's noise options (teacher_options),
    set on the datamanager so that the run names the cache make-dataset wrote."""
    config = qsplat_trainer_config()
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise DatasetError("--device cuda: no CUDA device is available")
    config.machine.device_type = "cuda" if use_cuda else "cpu"
    config.vis = "tensorboard"
    config.output_dir = Path(scene_dir)
    config.experiment_name = f"fit-{kind}"
    config.timestamp = kind
    config.max_num_iterations = steps
    config.steps_per_save = steps
    config.save_only_latest_checkpoint = True
    config.logging.local_writer.enable = False
    config.pipeline.datamanager.data = Path(scene_dir)
    config.pipeline.datamanager.teacher = "synthetic"  # the run knows its cache (predict-features, ns-eval mIoU)
    for key, value in (teacher or {}).items():
        setattr(config.pipeline.datamanager, key, value)
    model = config.pipeline.model
    model.feature_warmup_steps = steps + 1  # RGB only: the feature loss never starts
    for key, value in _fit_model_options(kind, depth_loss_mult).items():
        setattr(model, key, value)
    return config


@contextlib.contextmanager
def quiet_nerfstudio():
    """Silence nerfstudio's console (set-up messages, its own progress spinners), which would tear our
    progress display; errors still raise."""
    quiet = CONSOLE.quiet
    CONSOLE.quiet = True
    try:
        yield
    finally:
        CONSOLE.quiet = quiet


def _eval_psnr(pipeline, split: str = "eval", stride: int = 1) -> float:
    """Mean PSNR of the RGB renders of a split's views (no feature maps rendered)."""
    model = pipeline.model
    dm = pipeline.datamanager
    if split == "eval":
        pairs = list(dm.fixed_indices_eval_dataloader)
    else:
        cams = dm.train_dataset.cameras
        pairs = [(cams[i:i + 1].to(model.device), dm.cached_train[i]) for i in range(0, len(cams), stride)]
    was_training, map_outputs = model.training, model.feature_map_outputs
    model.eval()
    model.feature_map_outputs = False
    values = []
    try:
        with torch.no_grad():
            for camera, batch in pairs:
                rgb = model.get_outputs(camera.to(model.device))["rgb"]
                gt = batch["image"].to(rgb.device)
                gt = gt.float() / 255.0 if gt.dtype == torch.uint8 else gt
                mse = ((rgb - gt[..., :3]) ** 2).mean().clamp(min=1e-10)
                values.append(float(-10.0 * torch.log10(mse)))
    finally:
        model.train(was_training)
        model.feature_map_outputs = map_outputs
    return sum(values) / len(values)


def fit_scene(scene_dir: Path, kind: str, steps: int, depth_loss_mult: Optional[float] = None,
              device: str = "auto", report: Optional[Callable[[int, int], None]] = None,
              teacher: Optional[Dict[str, float]] = None) -> dict:
    """Fit a 3DGS to a scene with `steps` q-splat RGB steps; returns timings, PSNR (eval views, before and
    after; train views after) and the Gaussian count. The checkpoint is saved once, at the end."""
    report = report or (lambda *_: None)
    start = time.perf_counter()
    config = fit_config(scene_dir, kind, steps, depth_loss_mult, device, teacher)
    with quiet_nerfstudio():
        config.save_config()
        trainer = config.setup(local_rank=0, world_size=1)
        trainer.setup()
        setup_s = time.perf_counter() - start
        psnr_init = _eval_psnr(trainer.pipeline)
        report(0, steps)
        t0 = time.perf_counter()
        before, after = TrainingCallbackLocation.BEFORE_TRAIN_ITERATION, TrainingCallbackLocation.AFTER_TRAIN_ITERATION
        for step in range(steps):
            for cb in trainer.callbacks:
                cb.run_callback_at_location(step, location=before)
            trainer.train_iteration(step)
            for cb in trainer.callbacks:
                cb.run_callback_at_location(step, location=after)
            report(step + 1, steps)
        train_s = time.perf_counter() - t0
        trainer.save_checkpoint(steps - 1)
        psnr = _eval_psnr(trainer.pipeline)
        psnr_train = _eval_psnr(trainer.pipeline, "train", stride=3)
        num_gaussians = int(trainer.pipeline.model.num_points)
    return {"seconds": time.perf_counter() - start, "setup_seconds": setup_s, "train_seconds": train_s,
            "steps": steps, "psnr": psnr, "psnr_init": psnr_init, "psnr_train": psnr_train,
            "num_gaussians": num_gaussians, "device": config.machine.device_type}


# ---------------------------------------------------------------------------------------------------
# The dataset
# ---------------------------------------------------------------------------------------------------


def _check_resume(cfg: MakeDataset, out: Path) -> None:
    old = _read_json(out / "dataset.json")
    if old is None:
        if out.exists() and any(p for p in out.iterdir() if not p.name.startswith(".")):
            raise DatasetError(f"{out} exists, is not empty and has no dataset.json: not a dataset made by "
                               "make-dataset; choose another --out")
        return
    if old.get("format") != FORMAT:
        raise DatasetError(f"{out}/dataset.json is not a {FORMAT} file; choose another --out")
    mine, theirs = content_settings(cfg), old.get("settings", {})
    changed = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
    if changed:
        detail = ", ".join(f"{k}: {theirs.get(k)!r} -> {mine.get(k)!r}" for k in changed)
        raise DatasetError(f"{out} was made with other settings ({detail}). Resume it with its settings, or make a "
                           f"new dataset in another --out (only --scenes, --val-scenes, --fits and --jobs may change).")


def _write_dataset_json(cfg: MakeDataset, out: Path, scenes: Dict[int, dict], seconds: float,
                        complete: bool) -> dict:
    rows = []
    for index in sorted(scenes):
        markers = scenes[index]
        rows.append({"name": scene_name(index), "seed": scene_seed(cfg.seed, index),
                     "split": "val" if index >= cfg.scenes - cfg.val_scenes else "train",
                     **{stage: {k: v for k, v in m.items() if k != "settings"} for stage, m in markers.items()}})
    summary = _summary(cfg, scenes, seconds)
    payload = {"format": FORMAT, "settings": content_settings(cfg), "scenes_requested": cfg.scenes,
               "val_scenes": cfg.val_scenes, "fits": list(cfg.fits), "complete": complete, "summary": summary,
               "scenes": rows}
    _write_json_atomic(out / "dataset.json", payload)
    return payload


def _mean(values: Sequence[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None


def _summary(cfg: MakeDataset, scenes: Dict[int, dict], seconds: float) -> dict:
    def stage_values(stage, key):
        return [m[stage][key] for m in scenes.values() if stage in m and key in m[stage]]

    summary = {"scenes": len(scenes), "seconds": seconds,
               "generate_seconds_mean": _mean(stage_values("generate", "seconds")),
               "teacher_seconds_mean": _mean(stage_values("teacher", "seconds"))}
    for kind in cfg.fits:
        stage = f"fit-{kind}"
        summary[stage] = {"seconds_mean": _mean(stage_values(stage, "seconds")),
                          "psnr_mean": _mean(stage_values(stage, "psnr")),
                          "psnr_init_mean": _mean(stage_values(stage, "psnr_init")),
                          "num_gaussians_mean": _mean(stage_values(stage, "num_gaussians"))}
    return summary


def write_splits(cfg: MakeDataset, out: Path) -> dict:
    names = [scene_name(i) for i in range(cfg.scenes)]
    num_train = cfg.scenes - cfg.val_scenes
    splits = {"train": names[:num_train], "val": names[num_train:]}
    runs = {kind: {split: [str((fit_run_dir(Path(n), kind) / "config.yml")) for n in members]
                   for split, members in splits.items()} for kind in cfg.fits}
    payload = {"format": SPLITS_FORMAT, **splits, "runs": runs,
               "note": "paths are relative to this file's folder; runs[fit][split] are the fits' config.yml"}
    _write_json_atomic(out / "splits.json", payload)
    return payload


def make_dataset(cfg: MakeDataset) -> dict:
    """Build (or resume) the dataset; returns {"line": the summary line, "dataset": dataset.json's content}."""
    validate(cfg)
    out = Path(cfg.out).absolute()
    _check_resume(cfg, out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    cfg_dict = _config_to_dict(cfg)
    cfg_dict["out"] = str(out)
    scenes: Dict[int, dict] = {}
    _write_dataset_json(cfg, out, scenes, 0.0, complete=False)  # settings first: a rerun checks against them
    stages = ["generate", "teacher"] + [f"fit-{k}" for k in cfg.fits]
    with _DatasetProgress(cfg, stages) as bar:
        if cfg.jobs == 1:
            for index in range(cfg.scenes):
                scenes[index] = build_scene_stages(cfg_dict, index, str(out), bar.reporter(index))
                bar.scene_done(index, scenes[index])
                _write_dataset_json(cfg, out, scenes, time.perf_counter() - start, complete=False)
        else:
            _run_parallel(cfg, cfg_dict, out, scenes, bar, start)
    seconds = time.perf_counter() - start
    payload = _write_dataset_json(cfg, out, scenes, seconds, complete=True)
    write_splits(cfg, out)
    s = payload["summary"]
    fits = "; ".join(f"fit-{k} {s[f'fit-{k}']['seconds_mean']:.1f} s/scene, PSNR {s[f'fit-{k}']['psnr_mean']:.2f} dB "
                     f"(init {s[f'fit-{k}']['psnr_init_mean']:.2f})" for k in cfg.fits)
    line = (f"[q-splat] dataset {out}: {len(scenes)} scenes ({cfg.scenes - cfg.val_scenes} train, {cfg.val_scenes} "
            f"val) in {seconds:.1f} s; per scene: generate {s['generate_seconds_mean']:.1f} s, teacher "
            f"{s['teacher_seconds_mean']:.1f} s; {fits}. Train GS-Net: qsplat train-gsnet --dataset {out}")
    return {"line": line, "dataset": payload}


def _run_parallel(cfg: MakeDataset, cfg_dict: dict, out: Path, scenes: Dict[int, dict], bar, start: float) -> None:
    ctx = mp.get_context("spawn")  # fresh interpreters: no forked torch / rich state
    manager = SyncManager(ctx=ctx)
    manager.start(_die_with_parent, (os.getpid(),))
    with manager:
        events = manager.Queue()
        with ProcessPoolExecutor(max_workers=cfg.jobs, mp_context=ctx, initializer=_worker_init,
                                 initargs=(os.getpid(),)) as pool:
            pending = {pool.submit(_worker_build, cfg_dict, i, str(out), events): i for i in range(cfg.scenes)}
            try:
                while pending:
                    finished, _ = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                    while True:
                        try:
                            index, stage, completed, total = events.get_nowait()
                        except queue_mod.Empty:
                            break
                        bar.reporter(index)(stage, completed, total)
                    for future in finished:
                        index = pending.pop(future)
                        scenes[index] = future.result()  # a worker's exception stops the run here
                        bar.scene_done(index, scenes[index])
                        _write_dataset_json(cfg, out, scenes, time.perf_counter() - start, complete=False)
            except BaseException:
                for future in pending:
                    future.cancel()
                raise


def _die_with_parent(parent_pid: int) -> None:
    """Linux: this helper process gets SIGKILL when make-dataset's process dies (kill -9 included), so no fit
    goes on for a dataset nobody is writing (the next run redoes the unfinished scenes anyway)."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(1)


def _worker_init(parent_pid: int) -> None:
    _die_with_parent(parent_pid)

    torch.set_num_threads(1)


def _worker_build(cfg_dict: dict, index: int, dataset_dir: str, events) -> dict:
    return build_scene_stages(cfg_dict, index, dataset_dir,
                              lambda stage, completed, total: events.put((index, stage, completed, total)))


class _DatasetProgress(OptionalProgress):
    """One rich progress bar per scene (its current stage and step), one for the whole dataset."""

    def __init__(self, cfg: MakeDataset, stages: List[str]):
        self.cfg, self.stages, self.bar, self.tasks = cfg, stages, None, {}
        self.units = {"generate": 1, "teacher": 1, **{s: cfg.fit_steps for s in stages if s.startswith("fit-")}}
        self.offset = {}
        total = 0
        for s in stages:
            self.offset[s] = total
            total += self.units[s]
        self.total = total
        if cfg.progress:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn(r"\[q-splat] {task.description}"), BarColumn(), TextColumn("{task.fields[stage]}"),
                                MofNCompleteColumn(), TimeElapsedColumn())
            self.overall = self.bar.add_task("dataset", total=cfg.scenes, stage="scenes")

    def _task(self, index: int):
        if index not in self.tasks:
            self.tasks[index] = self.bar.add_task(scene_name(index), total=self.total, stage="")
        return self.tasks[index]

    def reporter(self, index: int) -> Progress:
        def report(stage: str, completed: int, total: int) -> None:
            if self.bar is None:
                return
            label = f"{stage} {completed}/{total}" if stage.startswith("fit-") else stage
            self.bar.update(self._task(index), completed=self.offset[stage] + completed * self.units[stage] // max(total, 1),
                            stage=label)
        return report

    def scene_done(self, index: int, markers: dict) -> None:
        if self.bar is None:
            return
        fits = ", ".join(f"{k} {m['psnr']:.1f} dB" for k, m in markers.items() if k.startswith("fit-"))
        self.bar.update(self._task(index), completed=self.total, stage=f"done ({fits})")
        self.bar.advance(self.overall)


# ---------------------------------------------------------------------------------------------------
# Reading a dataset (train-gsnet --dataset)
# ---------------------------------------------------------------------------------------------------


def dataset_scenes(dataset_dir: Path, split: str = "train", fit: str = "plain") -> List[Path]:
    """The scenes of a split as GS-Net specs: the fits' config.yml (fit plain / depth), or the scene folders
    (fit none: Gaussians made from the labelled point cloud)."""
    dataset_dir = Path(dataset_dir)
    splits = _read_json(dataset_dir / "splits.json")
    if splits is None or splits.get("format") != SPLITS_FORMAT:
        raise FileNotFoundError(f"{dataset_dir}/splits.json is missing or not a {SPLITS_FORMAT} file: is "
                                f"{dataset_dir} a dataset made by `qsplat make-dataset` (and did it finish)?")
    if split not in ("train", "val"):
        raise ValueError(f"split must be train or val, got {split!r}")
    if fit == "none":
        paths = [dataset_dir / name for name in splits[split]]
    else:
        if fit not in splits.get("runs", {}):
            raise ValueError(f"{dataset_dir} has no '{fit}' fits (it has: {', '.join(splits.get('runs', {})) or 'none'}); "
                             f"add them with `qsplat make-dataset --out {dataset_dir} --fits ... {fit}` or pick another "
                             f"--fit (none: Gaussians from the point clouds)")
        paths = [dataset_dir / p for p in splits["runs"][fit][split]]
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} scenes of {dataset_dir} ({split}) are missing, e.g. {missing[0]}; "
                                f"rerun the make-dataset command to complete it")
    return paths


def main(cfg: MakeDataset) -> None:
    """`qsplat` runs this with the parsed options."""
    try:
        summary = make_dataset(cfg)
    except DatasetError as e:
        raise SystemExit(f"[q-splat] {e}") from None
    print(summary["line"])
