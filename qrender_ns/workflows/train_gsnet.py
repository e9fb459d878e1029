"""`qsplat train-gsnet`: train GS-Net across scenes with the rendered-feature contrastive loss.

Per step and process, `scenes_per_step` scenes are drawn (a `DistributedSampler` over the scene list,
reshuffled every epoch); for each, GS-Net predicts every Gaussian's feature, `views_per_scene` random
training views are rendered with Q-Render (`rasterize_features(..., num_quantiles=K)`), and the
contrastive loss (the paper's Eq. 2, or InfoNCE) is taken at sampled pixels of every teacher mask.
Adam with reduce-on-plateau on the epoch loss, as the paper.

    qsplat train-gsnet --scenes data/s0 data/s1 outputs/s2/q-splat/run/config.yml --out gsnet.ckpt
    torchrun --nproc-per-node 2 -m qrender_ns.workflows.train_gsnet --scenes ... --out gsnet.ckpt   # DDP

DDP: gloo on CPU, nccl on GPUs; gradients are averaged across processes; rank 0 writes the
checkpoint (atomically, every `save_every` steps and at the end) and the TensorBoard log
(`<out stem>_tb/` next to the checkpoint). Re-running the same command resumes from `--out`
(weights, optimiser, scheduler, step) unless `--no-resume`. With `--ema-decay D` an exponential moving
average of the weights is kept too and written beside it as `<out stem>_ema.ckpt` (a GS-Net checkpoint like
any other: predict with it as with --out).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections import OrderedDict
from dataclasses import asdict, replace
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data.distributed import DistributedSampler

from qrender_ns.features.losses import infonce_loss, paper_contrastive_loss, sample_mask_pixels
from qrender_ns.features.metrics import mean_class_iou
from qrender_ns.gsnet.augment import augment_inputs
from qrender_ns.gsnet.backproject import _resize_nearest
from qrender_ns.gsnet.gsnet import GSNet, read_checkpoint
from qrender_ns.render import rasterize_features
from qrender_ns.teachers.text import load_text_encoder
from qrender_ns.utils.fsio import atomic_write_json
from qrender_ns.utils.progress import OptionalProgress
from qrender_ns.workflows.gsnet_scenes import TrainingScene, load_scene
from qrender_ns.workflows.make_dataset import dataset_scenes
from qrender_ns.workflows.options import TrainGSNet


def ema_path_of(out: Path) -> Path:
    """Where train-gsnet writes the weight average of the checkpoint `out` (--ema-decay)."""
    return out.with_name(f"{out.stem}_ema{out.suffix}")


class _WeightAverage:
    """Exponential moving average of a net's floating-point state (parameters and BN running statistics;
    integer buffers such as BN's batch counters are copied)."""

    def __init__(self, net: GSNet, decay: float, path: Path, step: int):
        self.decay, self.path = decay, path
        self.net = GSNet(net.config).to(next(net.parameters()).device)
        self.net.load_state_dict(net.state_dict())
        resumed = False
        if path.is_file():
            payload = read_checkpoint(path, map_location=next(net.parameters()).device)
            info = payload["extra"].get("ema") or {}
            if payload["config"] == net.config.to_dict() and info.get("step") == step:
                self.net.load_weights(payload["state_dict"], str(path))
                resumed = True
            else:  # another run's, or out of step with the checkpoint (e.g. killed between the two saves)
                print(f"[q-splat] GS-Net: {path} does not match step {step} of the checkpoint; the weight "
                      "average restarts from the current weights")
        if resumed:
            print(f"[q-splat] GS-Net: resuming the weight average {path} at step {step}")
        self.net.eval()
        self._pairs = list(zip(self.net.state_dict().values(), net.state_dict().values()))

    @torch.no_grad()
    def update(self, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        for mine, live in self._pairs:
            if mine.dtype.is_floating_point:
                mine.lerp_(live, 1 - decay)
            else:
                mine.copy_(live)

    def save(self, step: int) -> None:
        self.net.save_checkpoint(self.path, extra={"ema": {"decay": self.decay, "step": step}})


# ---------------------------------------------------------------------------------------------------
# Loss on one scene
# ---------------------------------------------------------------------------------------------------


def render_features(scene: TrainingScene, features: Tensor, views, view_ids: List[int], scale: float,
                    num_quantiles: Optional[int], backend: str = "auto") -> Tuple[Tensor, Tensor]:
    """Q-Render the per-Gaussian features [N, C] into views[view_ids] at `scale` x resolution:
    (features [V, H, W, C], alphas [V, H, W, 1])."""
    g = scene.gaussians
    width, height = max(1, round(views.width * scale)), max(1, round(views.height * scale))
    ids = torch.as_tensor(view_ids, dtype=torch.long)
    Ks = views.Ks[ids].clone()
    Ks[:, :2] *= torch.tensor([width / views.width, height / views.height])[:, None]
    out, alpha, _ = rasterize_features(g.means, g.quats, g.scales, g.opacities, features,
                                       views.viewmats[ids].to(features), Ks.to(features), width, height,
                                       num_quantiles=num_quantiles, backend=backend)
    return out, alpha


def scene_loss(net: nn.Module, scene: TrainingScene, cfg: TrainGSNet, generator: torch.Generator,
               log_temperature: Optional[Tensor] = None, augment: bool = False) -> Tuple[Tensor, Dict[str, float]]:
    """Mean contrastive loss over `views_per_scene` random training views of one scene. Always
    connected to the network's output (a zero loss when no view has >= 2 masks), as DDP requires.
    `augment`: the network sees `cfg.augment`'s transform of the Gaussians; the render uses them as they are."""
    g = scene.gaussians
    inputs = augment_inputs(g.gsnet_inputs(), cfg.augment, generator) if augment else g.gsnet_inputs()
    features = net(**inputs, units_per_metre=scene.units_per_metre)
    views = scene.train
    num_views = len(views.image_keys)
    view_ids = torch.randperm(num_views, generator=generator)[:min(cfg.views_per_scene, num_views)].tolist()
    rendered, _ = render_features(scene, features, views, view_ids, cfg.render_scale, cfg.num_quantiles,
                                  cfg.rasterizer_backend)
    losses = []
    for rendered_view, v in zip(rendered, view_ids):
        mask_ids, embeddings = scene.teacher.read(views.image_keys[v])
        mask_ids = _resize_nearest(mask_ids, rendered_view.shape[0], rendered_view.shape[1]).to(features.device)
        pixels, targets = sample_mask_pixels(mask_ids, cfg.pixels_per_mask, generator=generator)
        if torch.unique(targets).numel() < 2:
            continue
        pixel_features = rendered_view.reshape(-1, rendered_view.shape[-1])[pixels]
        embeddings = embeddings.to(features.device)
        if cfg.loss == "paper":
            losses.append(paper_contrastive_loss(pixel_features, targets, embeddings))
        else:
            losses.append(infonce_loss(pixel_features, targets, embeddings, log_temperature))
    if not losses:
        return features.sum() * 0.0, {"views": 0.0}
    loss = torch.stack(losses).mean()
    if not torch.isfinite(loss):
        raise FloatingPointError(f"GS-Net loss is NaN/Inf on scene {scene.name}: check its teacher cache and "
                                 "Gaussians, or lower --lr")
    return loss, {"views": float(len(losses))}


# ---------------------------------------------------------------------------------------------------
# Evaluation (2D and 3D mIoU of the class argmax)
# ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_features(scene: TrainingScene, features: Tensor, num_quantiles: Optional[int] = 10,
                      scale: float = 1.0, backend: str = "auto") -> Dict[str, float]:
    """mIoU of the class argmax (cosine to the teacher's class text embeddings): `miou_3d` over the
    Gaussians when they carry labels (generated scenes' point clouds), `miou_2d` over the eval views
    when ground-truth class maps exist (prediction 0 where nothing is rendered)."""
    from PIL import Image

    if not scene.class_names:
        return {}
    text = load_text_encoder(scene.teacher_root).encode(scene.class_names).to(features)
    ids = torch.tensor(scene.class_ids, device=features.device)
    result: Dict[str, float] = {}
    logits = F.normalize(features, dim=-1) @ F.normalize(text, dim=-1).T
    if scene.gaussians.labels is not None:
        result["miou_3d"] = mean_class_iou(ids[logits.argmax(-1)], scene.gaussians.labels.to(features.device))
    views = scene.eval
    if views is not None and views.class_maps and all(p is not None and Path(p).is_file() for p in views.class_maps):
        scores = []
        for v in range(len(views.image_keys)):
            rendered, alpha = render_features(scene, features, views, [v], scale, num_quantiles, backend)
            pred = ids[(F.normalize(rendered[0], dim=-1) @ F.normalize(text, dim=-1).T).argmax(-1)]
            pred = torch.where(alpha[0, ..., 0] > 0, pred, torch.zeros_like(pred))
            truth = torch.from_numpy(__import__("numpy").asarray(Image.open(views.class_maps[v])).astype("int64"))
            truth = _resize_nearest(truth, pred.shape[0], pred.shape[1]).to(pred.device)
            scores.append(mean_class_iou(pred, truth))
        result["miou_2d"] = sum(scores) / len(scores) if scores else float("nan")
    return result


@torch.no_grad()
def evaluate_net(net: GSNet, scene: TrainingScene, num_quantiles: Optional[int] = 10, scale: float = 1.0,
                 backend: str = "auto") -> Dict[str, float]:
    """Feed-forward GS-Net on a scene, then `evaluate_features` (+ `predict_s`, the forward time)."""
    was_training = net.training
    net.eval()
    t0 = time.perf_counter()
    features = net(**scene.gaussians.gsnet_inputs(), units_per_metre=scene.units_per_metre)
    seconds = time.perf_counter() - t0
    net.train(was_training)
    return {**evaluate_features(scene, features, num_quantiles, scale, backend), "predict_s": seconds}


# ---------------------------------------------------------------------------------------------------
# Training loop
# ---------------------------------------------------------------------------------------------------


class _SceneStore:
    """Scenes loaded on first use, at most `capacity` kept (LRU)."""

    def __init__(self, specs, cfg: TrainGSNet, device: torch.device):
        self.specs, self.cfg, self.device = list(specs), cfg, device
        self.cache: "OrderedDict[int, TrainingScene]" = OrderedDict()

    def __len__(self) -> int:
        return len(self.specs)

    def __getitem__(self, index: int) -> TrainingScene:
        if index in self.cache:
            self.cache.move_to_end(index)
            return self.cache[index]
        cfg = self.cfg
        scene = load_scene(self.specs[index], teacher=cfg.teacher, units_per_metre=cfg.units_per_metre,
                           point_scale=cfg.point_scale, with_eval=False)
        scene.gaussians = scene.gaussians.to(self.device)
        self.cache[index] = scene
        while len(self.cache) > max(1, cfg.max_cached_scenes):
            self.cache.popitem(last=False)
        return scene


def _distributed(cfg: TrainGSNet) -> Tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available() and cfg.device != "cpu"
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    return rank, world, device


def _all_mean(values: List[float], world: int, device) -> List[float]:
    if world == 1:
        return values

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / world).tolist()


def _scene_stream(num_scenes: int, rank: int, world: int, seed: int, start_epoch: int, skip: int
                  ) -> Iterator[Tuple[int, int]]:
    """(scene index, epoch) forever: this rank's share of every epoch's shuffled scene order."""
    sampler = DistributedSampler(range(num_scenes), num_replicas=world, rank=rank, shuffle=True, seed=seed,
                                 drop_last=False)
    epoch = start_epoch
    while True:
        sampler.set_epoch(epoch)
        for i, index in enumerate(sampler):
            if skip:
                skip -= 1
                continue
            yield index, epoch
        epoch += 1


def _train_state(cfg: TrainGSNet) -> dict:
    d = asdict(cfg)
    return {k: (str(v) if isinstance(v, Path) else [str(x) for x in v] if k == "scenes" else v)
            for k, v in d.items() if k != "gsnet"}


def _dataset_specs(cfg: TrainGSNet, split: str) -> List[Path]:
    try:
        return dataset_scenes(cfg.dataset, split, cfg.fit)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"[q-splat] --dataset {cfg.dataset}: {e}") from None


def train_gsnet(cfg: TrainGSNet) -> dict:
    """Run training; returns a summary (steps, last loss, seconds, checkpoint path; val mIoU with --dataset)."""
    if cfg.dataset is not None:
        train_specs = _dataset_specs(cfg, "train")
        cfg = replace(cfg, scenes=tuple(cfg.scenes) + tuple(p for p in train_specs if p not in cfg.scenes))
    if not cfg.scenes:
        raise SystemExit("--scenes: give at least one scene folder or run config.yml (or --dataset)")
    rank, world, device = _distributed(cfg)
    torch.manual_seed(cfg.seed)
    net = GSNet(cfg.gsnet).to(device)
    log_temperature = nn.Parameter(torch.tensor(math.log(0.07), device=device)) if cfg.loss == "infonce" else None
    params = list(net.parameters()) + ([log_temperature] if log_temperature is not None else [])
    optimizer = torch.optim.Adam(params, lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=cfg.plateau_factor,
                                                           patience=cfg.plateau_patience)
    step, epoch, consumed = 0, 0, 0
    seconds_before = 0.0  # training time of the runs this one resumes
    resumed_loss = float("nan")  # their last step's loss (reported when this run has no step left to do)
    if cfg.resume and cfg.out.is_file():
        payload = read_checkpoint(cfg.out, map_location=device)
        if payload["config"] != cfg.gsnet.to_dict():
            raise SystemExit(f"{cfg.out} holds a GS-Net with another architecture; pass --no-resume to start over "
                             f"(it will be overwritten) or choose another --out")
        net.load_weights(payload["state_dict"], str(cfg.out))
        state = payload["extra"].get("training") or {}
        if state:
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            step, epoch, consumed = int(state["step"]), int(state["epoch"]), int(state["consumed_in_epoch"])
            seconds_before = float(state.get("seconds_total", 0.0))
            resumed_loss = float(state.get("last_loss", float("nan")))
            if log_temperature is not None and "log_temperature" in state:
                log_temperature.data.fill_(float(state["log_temperature"]))
        if rank == 0:
            print(f"[q-splat] GS-Net: resuming {cfg.out} at step {step}")
    model: nn.Module = net
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    store = _SceneStore(cfg.scenes, cfg, device)
    stream = _scene_stream(len(store), rank, world, cfg.seed, epoch, consumed)
    generator = torch.Generator().manual_seed(cfg.seed * 1000 + rank * 7919 + step)
    writer = None
    if rank == 0 and cfg.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(cfg.out.parent / f"{cfg.out.stem}_tb"))
    progress = _progress(cfg, rank, step)
    average = _WeightAverage(net, cfg.ema_decay, ema_path_of(cfg.out), step) if cfg.ema_decay > 0 and rank == 0 \
        else None
    if rank == 0:
        print(f"[q-splat] GS-Net training: {len(store)} scenes, {world} process(es) on {device}, "
              f"steps {step}..{cfg.steps}, {sum(p.numel() for p in net.parameters()) / 1e6:.2f} M parameters")

    def save():
        if rank != 0:
            return
        training = {"step": step, "epoch": epoch, "consumed_in_epoch": consumed,
                    "seconds_total": seconds_before + time.perf_counter() - start - val_seconds[0],
                    "last_loss": last_loss,
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "config": _train_state(cfg)}
        if log_temperature is not None:
            training["log_temperature"] = float(log_temperature)
        net.save_checkpoint(cfg.out, extra={"training": training})
        if average is not None:  # after the checkpoint: a kill between the two leaves an average marked stale
            average.save(step)

    epoch_losses: List[float] = []
    last_loss, start = resumed_loss, time.perf_counter()
    val_seconds = [0.0]  # spent in --val-every evaluations (not training time)
    net.train()
    with progress:
        while step < cfg.steps:
            optimizer.zero_grad(set_to_none=True)
            step_losses = []
            for i in range(cfg.scenes_per_step):
                index, scene_epoch = next(stream)
                if scene_epoch != epoch:  # all ranks cross epochs at the same draw (equal sampler lengths)
                    if epoch_losses:  # empty only right after resuming at an epoch's end (on every rank)
                        scheduler.step(_all_mean([sum(epoch_losses) / len(epoch_losses)], world, device)[0])
                    epoch, consumed, epoch_losses = scene_epoch, 0, []
                consumed += 1
                sync = contextlib.nullcontext() if (world == 1 or i == cfg.scenes_per_step - 1) else model.no_sync()
                with sync:
                    loss, _ = scene_loss(model, store[index], cfg, generator, log_temperature, augment=True)
                    (loss / cfg.scenes_per_step).backward()
                step_losses.append(float(loss.detach()))
                epoch_losses.append(step_losses[-1])
            optimizer.step()
            step += 1
            if average is not None:
                average.update(step)
            local = sum(step_losses) / len(step_losses)
            last_loss = _all_mean([local], world, device)[0]
            if rank == 0:
                progress.update_loss(step, last_loss, optimizer.param_groups[0]["lr"])
                if writer is not None and (step % cfg.log_every == 0 or step == cfg.steps):
                    writer.add_scalar("gsnet/loss", last_loss, step)
                    writer.add_scalar("gsnet/lr", optimizer.param_groups[0]["lr"], step)
                    writer.add_scalar("gsnet/num_voxels", net.last_stats.get("num_voxels", 0), step)
                if step % cfg.save_every == 0 and step < cfg.steps:
                    save()
                if cfg.dataset is not None and cfg.val_every > 0 and step % cfg.val_every == 0 and step < cfg.steps:
                    t_val = time.perf_counter()
                    val = evaluate_dataset_split(net, cfg, "val", step=step)
                    if average is not None:
                        evaluate_dataset_split(average.net, replace(cfg, out=average.path), "val", step=step)
                    val_seconds[0] += time.perf_counter() - t_val
                    if writer is not None:
                        for key, value in val.get("mean", {}).items():
                            writer.add_scalar(f"gsnet/val_{key}", value, step)
    save()
    seconds = time.perf_counter() - start - val_seconds[0]
    if writer is not None:
        writer.close()
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    summary = {"checkpoint": str(cfg.out), "steps": step, "loss": last_loss, "seconds": seconds,
               "seconds_total": seconds_before + seconds,
               "world_size": world, "backend": net.backend_name, "device": str(device)}
    if rank == 0:
        print(f"[q-splat] GS-Net checkpoint {cfg.out} (step {step}, loss {last_loss:.4f}, {seconds:.1f} s, "
              f"sparse-conv backend {net.backend_name})")
        if cfg.dataset is not None and cfg.eval_val:
            summary["val"] = evaluate_dataset_split(net, cfg, "val", step=step)
            if average is not None:
                summary["val_ema"] = evaluate_dataset_split(average.net, replace(cfg, out=average.path), "val",
                                                            step=step)
    if average is not None:
        summary["ema_checkpoint"] = str(average.path)
    return summary


def evaluate_dataset_split(net: GSNet, cfg: TrainGSNet, split: str = "val", step: Optional[int] = None) -> dict:
    """Feed-forward mIoU (evaluate_net) on every scene of a dataset split; written to <out stem>_<split>.json."""
    specs = _dataset_specs(cfg, split)
    if not specs:
        return {}
    device = next(net.parameters()).device
    rows = []
    for spec in specs:
        scene = load_scene(spec, teacher=cfg.teacher, units_per_metre=cfg.units_per_metre,
                           point_scale=cfg.point_scale)
        scene.gaussians = scene.gaussians.to(device)
        rows.append({"scene": str(spec), "name": scene.name,
                     **evaluate_net(net, scene, cfg.num_quantiles, cfg.render_scale, cfg.rasterizer_backend)})
    keys = sorted({k for r in rows for k in r if k.startswith("miou")})
    mean = {k: sum(r[k] for r in rows if k in r) / sum(1 for r in rows if k in r) for k in keys}
    path = cfg.out.parent / f"{cfg.out.stem}_{split}.json"
    history = []  # the means of earlier evaluations of this checkpoint's training (--val-every, resumed runs)
    if step is not None and path.is_file():
        with contextlib.suppress(ValueError, OSError):
            history = [h for h in json.loads(path.read_text()).get("history", [])
                       if isinstance(h, dict) and h.get("step") is not None and h["step"] < step]
    if step is not None:
        history.append({"step": step, "mean": mean})
    result = {"split": split, "fit": cfg.fit, "step": step, "scenes": rows, "mean": mean, "history": history}
    atomic_write_json(path, result)
    scores = ", ".join(f"{k} {v:.3f}" for k, v in mean.items()) or "no ground truth"
    at = f" at step {step}" if step is not None else ""
    print(f"[q-splat] GS-Net{at} on {len(rows)} {split} scenes of {cfg.dataset}: {scores} ({path})")
    return result


class _progress(OptionalProgress):
    """A rich progress bar on rank 0 (silent elsewhere or with --no-progress)."""

    def __init__(self, cfg: TrainGSNet, rank: int, step: int):
        self.enabled = cfg.progress and rank == 0
        self.total, self.start = cfg.steps, step
        self.bar = None
        if self.enabled:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("GS-Net"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                                TextColumn("loss {task.fields[loss]}"), TextColumn("lr {task.fields[lr]}"),
                                TimeElapsedColumn(), TimeRemainingColumn())
            self.task = self.bar.add_task("train", total=cfg.steps, completed=step, loss="-", lr="-")

    def update_loss(self, step: int, loss: float, lr: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, loss=f"{loss:.4f}", lr=f"{lr:.2e}")


def main(cfg: TrainGSNet) -> None:
    """`qsplat` runs this with the parsed options."""
    train_gsnet(cfg)


if __name__ == "__main__":  # DDP: `torchrun --nproc-per-node N -m qrender_ns.workflows.train_gsnet ...` (docs/gsnet.md)
    import tyro

    tyro.cli(TrainGSNet).main()
