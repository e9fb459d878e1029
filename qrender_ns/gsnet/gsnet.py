"""GS-Net: a generalizable sparse 3D U-Net that predicts a 512-D feature for every Gaussian.

voxelize (centre sampling, 5 cm) -> per-voxel mean of the Gaussians' inputs (position, RGB, opacity:
the paper's 7 values; optionally log-scale and rotation) -> MinkUNet -> de-voxelize (each Gaussian
takes its voxel's feature; max over voxels with extent sampling) -> concatenated with a small MLP of
the Gaussian's own attributes (position inside its voxel, RGB, opacity, ...) -> MLP head -> 512 ->
L2-normalised. Positions are in metres: pass `units_per_metre` when the scene is not metric
(nerfstudio's dataparser scale for a metric capture).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Literal, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qrender_ns.gsnet.backbone import MinkUNet, get_backend, resolve_backend
from qrender_ns.gsnet.voxelize import Voxelization, devoxelize, devoxelize_trilinear, pool_to_voxels, voxelize

CHECKPOINT_FORMAT = "qsplat-gsnet/1"
_OPTIONAL_INPUTS = ("log_scale", "rotation")
_announced = set()


@dataclass
class GSNetConfig:
    """GS-Net architecture and voxelization (defaults: the paper's GS-Mink at 5 cm)."""

    voxel_size: float = 0.05
    """Voxel edge in metres (paper: 5 cm best; 2 cm close; 10 cm -3 mIoU; 1 cm and finer much worse)."""
    sampling: Literal["center", "extent"] = "center"
    """center: each Gaussian in its centre's voxel (paper); extent: also at +-1 sigma on its 3 axes."""
    devoxelize: Literal["voxel", "trilinear"] = "voxel"
    """How Gaussians read the voxel features: voxel = their own voxel's (max over touched voxels with extent
    sampling; the paper); trilinear = interpolated between the occupied voxel centres around them."""
    extra_inputs: Tuple[str, ...] = ()
    """Inputs beyond position, RGB, opacity: any of "log_scale", "rotation"."""
    position_frame: Literal["centered", "world"] = "centered"
    """Position input relative to the scene's bounding-box centre (translation invariant) or raw."""
    feature_dim: int = 512
    stem_channels: int = 32
    enc_channels: Tuple[int, ...] = (32, 64, 128, 256)
    dec_channels: Tuple[int, ...] = (128, 128, 96, 96)
    """MinkUNet14A widths (4 stride-2 levels, 5 resolutions)."""
    blocks_per_level: int = 1
    """Residual blocks per level (MinkUNet14: 1, MinkUNet18: 2, ...)."""
    norm: Literal["batch", "layer", "none"] = "batch"
    gaussian_mlp_channels: int = 32
    """Width of the per-Gaussian MLP of its own attributes, concatenated before the head. 0 = the paper's
    form: the head runs per voxel and Gaussians gather its 512-D output (much cheaper at 1e6 Gaussians)."""
    head_channels: int = 256
    backend: Literal["auto", "torch", "spconv", "minkowski"] = "auto"
    """Sparse-conv backend (auto: on CUDA minkowski, else spconv, else torch, whichever is installed; on CPU torch)."""

    def __post_init__(self):
        self.enc_channels = tuple(int(c) for c in self.enc_channels)
        self.dec_channels = tuple(int(c) for c in self.dec_channels)
        self.extra_inputs = tuple(self.extra_inputs)
        unknown = [i for i in self.extra_inputs if i not in _OPTIONAL_INPUTS]
        if unknown:
            raise ValueError(f"unknown GS-Net extra_inputs {unknown}; choose from {_OPTIONAL_INPUTS}")
        if self.voxel_size <= 0:
            raise ValueError(f"voxel_size must be > 0, got {self.voxel_size}")

    @property
    def in_channels(self) -> int:
        return 7 + 3 * ("log_scale" in self.extra_inputs) + 4 * ("rotation" in self.extra_inputs)

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "GSNetConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"GS-Net checkpoint config has unknown fields {sorted(unknown)} (newer q-splat?)")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


class GSNet(nn.Module):
    def __init__(self, config: Optional[GSNetConfig] = None):
        super().__init__()
        self.config = config = config or GSNetConfig()
        self.backbone = MinkUNet(config.in_channels, config.stem_channels, config.enc_channels, config.dec_channels,
                                 config.blocks_per_level, config.norm)
        g = config.gaussian_mlp_channels
        self.gaussian_mlp = None
        if g > 0:
            self.gaussian_mlp = nn.Sequential(nn.Linear(config.in_channels, g), nn.ReLU(inplace=True),
                                              nn.Linear(g, g), nn.ReLU(inplace=True))
        self.head = nn.Sequential(nn.Linear(self.backbone.out_channels + g, config.head_channels),
                                  nn.ReLU(inplace=True), nn.Linear(config.head_channels, config.feature_dim))
        self.backend_name: Optional[str] = None
        self.last_stats: Dict[str, float] = {}

    # ------------------------------------------------------------------ inputs
    def gaussian_inputs(self, means: Tensor, colors: Tensor, opacities: Tensor, scales: Optional[Tensor],
                        quats: Optional[Tensor], units_per_metre: float) -> Tensor:
        """Per-Gaussian input attributes [N, in_channels] (position in metres, values roughly in [-1, 1])."""
        n = means.shape[0]
        for name, t, shape in (("colors", colors, (n, 3)), ("opacities", opacities, (n,))):
            if tuple(t.shape) != shape:
                raise ValueError(f"GS-Net: `{name}` must have shape {list(shape)}, got {list(t.shape)}")
        pos = means / units_per_metre
        if self.config.position_frame == "centered" and n:
            pos = pos - (pos.min(0).values + pos.max(0).values) / 2
        parts = [pos, colors * 2 - 1, opacities[:, None] * 2 - 1]
        if "log_scale" in self.config.extra_inputs:
            if scales is None:
                raise ValueError("GS-Net config uses log_scale inputs: pass `scales` (linear)")
            parts.append(torch.log(scales.clamp_min(1e-8) / units_per_metre) / 5)
        if "rotation" in self.config.extra_inputs:
            if quats is None:
                raise ValueError("GS-Net config uses rotation inputs: pass `quats` (wxyz)")
            q = F.normalize(quats, dim=-1)
            parts.append(q * torch.where(q[:, :1] < 0, -1.0, 1.0))
        return torch.cat(parts, dim=1)

    def backend(self, device: torch.device):
        name = resolve_backend(self.config.backend, device)
        backend = get_backend(name)
        if name not in _announced:
            _announced.add(name)
            print(f"[q-splat] GS-Net sparse-conv backend: {backend.describe()}")
        self.backend_name = name
        return backend

    # ------------------------------------------------------------------ forward
    def forward(self, means: Tensor, colors: Tensor, opacities: Tensor, scales: Optional[Tensor] = None,
                quats: Optional[Tensor] = None, units_per_metre: float = 1.0,
                voxelization: Optional[Voxelization] = None, rows: Optional[Tensor] = None) -> Tensor:
        """L2-normalised features [N, feature_dim] of N Gaussians, or [R, feature_dim] of the Gaussians `rows`
        only (int64 [R]: e.g. the rows a training step's sampled pixels select, issue 27): the voxels and the
        U-Net see all N Gaussians as before, and the per-Gaussian part (de-voxelization, the Gaussian MLP and
        the 512-D head, and its output) runs for the R rows only; equal to forward(...)[rows]. Centre sampling
        with voxel de-voxelization reads R voxels; other modes de-voxelize all N and pick the rows.

        means [N, 3], colors [N, 3] RGB in [0, 1], opacities [N] in [0, 1], scales [N, 3] linear and
        quats [N, 4] wxyz (needed by extent sampling / the optional inputs). The inputs are treated
        as data: no gradient flows back into them."""
        n = means.shape[0]
        if means.dim() != 2 or means.shape[1] != 3:
            raise ValueError(f"GS-Net: `means` must have shape [N, 3], got {list(means.shape)}")
        if n == 0:
            return means.new_zeros(0, self.config.feature_dim)
        t0 = time.perf_counter()
        means, colors, opacities = means.detach().float(), colors.detach().float(), opacities.detach().float()
        scales = scales.detach().float() if scales is not None else None
        quats = quats.detach().float() if quats is not None else None
        if voxelization is None:
            voxelization = voxelize(means / units_per_metre, self.config.voxel_size, sampling=self.config.sampling,
                                    scales=None if scales is None else scales / units_per_metre, quats=quats)
        attrs = self.gaussian_inputs(means, colors, opacities, scales, quats, units_per_metre)
        voxel_in = pool_to_voxels(voxelization, attrs, "mean")
        t1 = time.perf_counter()
        voxel_out = self.backbone(self.backend(means.device), voxelization.coords, voxel_in)
        direct = voxelization.is_center_sampled and self.config.devoxelize == "voxel"
        def devox(features: Tensor) -> Tensor:
            if rows is not None and direct:  # each Gaussian reads its own voxel: R reads
                return features[voxelization.center_voxel[rows]]
            if self.config.devoxelize == "trilinear":
                out = devoxelize_trilinear(voxelization, features, means / units_per_metre)
            else:
                out = devoxelize(voxelization, features)
            return out if rows is None else out[rows]
        if self.gaussian_mlp is None:  # the paper's form: 512-D per voxel, scattered back (max-reduce)
            out = devox(self._run_head(voxel_out))
            if not direct:
                out = F.normalize(out, dim=-1)
        else:
            own = attrs.clone() if rows is None else attrs[rows]
            which = voxelization.center_voxel if rows is None else voxelization.center_voxel[rows]
            pos = means / units_per_metre if rows is None else means[rows] / units_per_metre
            own[:, :3] = (pos - voxelization.voxel_centers()[which]) / self.config.voxel_size  # in [-0.5, 0.5]
            per_gaussian = torch.cat([devox(voxel_out), self.gaussian_mlp(own)], dim=1)
            out = self._run_head(per_gaussian)
        self.last_stats = {"num_gaussians": float(n), "num_voxels": float(voxelization.num_voxels),
                           "voxelize_s": t1 - t0, "network_s": time.perf_counter() - t1}
        return out

    def _run_head(self, x: Tensor) -> Tensor:
        """Head (Linear -> ReLU -> Linear) + L2 normalisation per Gaussian, fused in row chunks: only
        the input and the normalised output are kept; the [N, head] and pre-normalisation [N, 512]
        intermediates (and autograd's temporaries of F.normalize) are never materialised for all
        Gaussians at once, which at 1e6 Gaussians is ~10 GB."""
        lin1, lin2 = self.head[0], self.head[2]
        return _FusedHead.apply(x, lin1.weight, lin1.bias, lin2.weight, lin2.bias)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, path: Union[str, Path], extra: Optional[dict] = None) -> Path:
        """Atomic save of {format, config, state_dict, extra}; loadable with weights_only=True."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"format": CHECKPOINT_FORMAT, "config": self.config.to_dict(),
                   "state_dict": {k: v.detach().cpu() for k, v in self.state_dict().items()},
                   "extra": extra or {}}
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save(payload, tmp)
        tmp.replace(path)
        return path

    @classmethod
    def from_checkpoint(cls, path: Union[str, Path], map_location="cpu",
                        expect_feature_dim: Optional[int] = None) -> "GSNet":
        payload = read_checkpoint(path, map_location)
        config = GSNetConfig.from_dict(payload["config"])
        if expect_feature_dim is not None and config.feature_dim != expect_feature_dim:
            raise ValueError(f"GS-Net checkpoint {path} predicts {config.feature_dim}-D features, "
                             f"this model needs {expect_feature_dim}-D")
        net = cls(config)
        net.load_weights(payload["state_dict"], str(path))
        return net

    def load_weights(self, state_dict: dict, source: str = "checkpoint") -> None:
        missing, unexpected = _diff_keys(self.state_dict(), state_dict)
        if missing or unexpected:
            raise ValueError(f"GS-Net {source} does not match this architecture: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]} (was it trained with another GS-Net config?)")
        own = self.state_dict()
        bad = [k for k, v in state_dict.items() if tuple(v.shape) != tuple(own[k].shape)]
        if bad:
            raise ValueError(f"GS-Net {source}: shape mismatch for {bad[:5]} "
                             f"(e.g. {bad[0]}: {tuple(state_dict[bad[0]].shape)} vs {tuple(own[bad[0]].shape)})")
        self.load_state_dict(state_dict)


class _FusedHead(torch.autograd.Function):
    """y = normalize(relu(x W1^T + b1) W2^T + b2), forward and backward in row chunks."""

    CHUNK = 1 << 15

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2):
        n = x.shape[0]
        y = x.new_empty(n, w2.shape[0])
        norms = x.new_empty(n, 1)
        for s in range(0, n, _FusedHead.CHUNK):
            z = torch.addmm(b2, torch.relu(torch.addmm(b1, x[s:s + _FusedHead.CHUNK], w1.T)), w2.T)
            norms[s:s + _FusedHead.CHUNK] = z.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            torch.div(z, norms[s:s + _FusedHead.CHUNK], out=y[s:s + _FusedHead.CHUNK])
        ctx.save_for_backward(x, w1, b1, w2, y, norms)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, w1, b1, w2, y, norms = ctx.saved_tensors
        grad_x = torch.empty_like(x)
        grad_w1, grad_b1 = torch.zeros_like(w1), torch.zeros_like(b1)
        grad_w2, grad_b2 = torch.zeros_like(w2), torch.zeros(w2.shape[0], dtype=w2.dtype, device=w2.device)
        for s in range(0, x.shape[0], _FusedHead.CHUNK):
            sl = slice(s, s + _FusedHead.CHUNK)
            h = torch.relu(torch.addmm(b1, x[sl], w1.T))
            g, yc = grad_y[sl], y[sl]
            grad_z = (g - yc * (g * yc).sum(-1, keepdim=True)) / norms[sl]
            grad_w2.addmm_(grad_z.T, h)
            grad_b2 += grad_z.sum(0)
            grad_h = (grad_z @ w2) * (h > 0)
            grad_w1.addmm_(grad_h.T, x[sl])
            grad_b1 += grad_h.sum(0)
            torch.mm(grad_h, w1, out=grad_x[sl])
        return grad_x, grad_w1, grad_b1, grad_w2, grad_b2


def _diff_keys(own: dict, other: dict):
    return sorted(set(own) - set(other)), sorted(set(other) - set(own))


def read_checkpoint(path: Union[str, Path], map_location="cpu") -> dict:
    """The payload of a GS-Net checkpoint, with clear errors for a missing or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GS-Net checkpoint {path} does not exist; train one with "
                                f"`qsplat train-gsnet --scenes <scene dirs or runs> --out {path}`")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001  (pickle errors come in many types)
        raise ValueError(f"{path} is not a readable GS-Net checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        hint = " (a nerfstudio checkpoint? pass it as a scene to train-gsnet instead)" if isinstance(payload, dict) \
            and "pipeline" in payload else ""
        raise ValueError(f"{path} is not a GS-Net checkpoint (format {found!r}, expected {CHECKPOINT_FORMAT!r}){hint}")
    return payload
