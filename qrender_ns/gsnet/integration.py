"""GS-Net inside QSplatModel (`--pipeline.model.feature-head gsnet`): building it, its inputs from
splatfacto's parameters, and a no-grad cache of its output for evaluation / the viewer."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

import torch
from torch import Tensor

from qrender_ns.gsnet.gsnet import GSNet, GSNetConfig

PARAM_GROUP = "gsnet"
DEFAULT_LR = 1e-3


def gaussian_inputs_from_params(params: Dict[str, Tensor], sh_degree: int) -> Dict[str, Tensor]:
    """GS-Net inputs from splatfacto's gauss_params: linear scales, opacities in [0, 1], RGB in [0, 1]
    (the SH DC colour for sh_degree > 0, sigmoid colours for sh_degree 0), all detached."""
    dc = params["features_dc"].detach()
    if sh_degree > 0 or params["features_rest"].shape[1] > 0:
        from nerfstudio.models.splatfacto import SH2RGB

        colors = SH2RGB(dc)
    else:
        colors = torch.sigmoid(dc)
    return {"means": params["means"].detach(), "colors": colors.clamp(0, 1),
            "opacities": torch.sigmoid(params["opacities"].detach()).reshape(-1),
            "scales": torch.exp(params["scales"].detach()), "quats": params["quats"].detach()}


def build_gsnet(config: GSNetConfig, feature_dim: int, checkpoint: Optional[Path], freeze: bool) -> GSNet:
    """A fresh GS-Net (config.feature_dim forced to the model's), or the one of `checkpoint`."""
    if checkpoint is not None:
        net = GSNet.from_checkpoint(checkpoint, expect_feature_dim=feature_dim)
        print(f"[q-splat] GS-Net weights loaded from {checkpoint}")
    else:
        if config.feature_dim != feature_dim:
            config = GSNetConfig.from_dict({**config.to_dict(), "feature_dim": feature_dim})
        net = GSNet(config)
    if freeze:
        net.requires_grad_(False)
    return net


class GSNetFeatures:
    """Runs GS-Net on a model's Gaussians; while no gradient is needed (eval, viewer, queries) the result
    is cached until a parameter or a Gaussian changes."""

    def __init__(self, net: GSNet, frozen: bool):
        self.net, self.frozen = net, frozen
        self._key = None
        self._value: Optional[Tensor] = None

    _INPUT_PARAMS = ("means", "features_dc", "features_rest", "opacities", "scales", "quats")

    def _state_key(self, params: Dict[str, Tensor], units_per_metre: float):
        tensors = [params[k] for k in self._INPUT_PARAMS] + list(self.net.parameters()) + list(self.net.buffers())
        return (tuple((t.data_ptr(), t._version, tuple(t.shape)) for t in tensors), self.net.training, units_per_metre)

    def rows_of(self, params: Dict[str, Tensor], sh_degree: int, units_per_metre: float = 1.0):
        """A callable rows [R] -> features [R, D] of those Gaussians only (GSNet.forward(rows=...)): the training
        step's sampled-pixel render asks it for the rows its pixels select (issue 27)."""
        inputs = gaussian_inputs_from_params(params, sh_degree)
        if self.frozen:
            self.net.eval()
        self._key = self._value = None

        def features_of(rows: Tensor) -> Tensor:
            with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
                return self.net(**inputs, units_per_metre=units_per_metre, rows=rows)

        return features_of

    def __call__(self, params: Dict[str, Tensor], sh_degree: int, units_per_metre: float = 1.0) -> Tensor:
        inputs = gaussian_inputs_from_params(params, sh_degree)
        if self.frozen:
            self.net.eval()  # frozen: BatchNorm uses its running statistics, never updates them
        grad = torch.is_grad_enabled() and not self.frozen and self.net.training
        if grad:
            self._key = self._value = None
            return self.net(**inputs, units_per_metre=units_per_metre)
        key = self._state_key(params, units_per_metre)
        if key != self._key:
            with torch.no_grad():
                self._value = self.net(**inputs, units_per_metre=units_per_metre)
            self._key = key
        return self._value
