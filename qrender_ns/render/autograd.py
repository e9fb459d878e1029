"""Thin autograd wrappers around the compiled kernels (C++/OpenMP and CUDA), as gsplat's cuda/_wrapper.py: whole
images or sampled pixels, and gsplat's `means2d.absgrad` after backward."""

from __future__ import annotations

import torch
from torch import Tensor

from qrender_ns.render import _backend


class _RasterizeToPixels(torch.autograd.Function):
    """Thin wrapper around the compiled forward/backward (CPU or CUDA), whole images or the
    sampled pixels `pixel_ids` (int64 [P], or None)."""

    @staticmethod
    def forward(ctx, means2d, conics, features, opacities, backgrounds, width, height, tile_size,
                isect_offsets, flatten_ids, num_quantiles, absgrad, kind, pixel_ids=None):
        ext = _backend.load_extension(with_cuda=kind == "cuda")
        sampled = pixel_ids is not None
        fwd = getattr(ext, f"rasterize_pixels_forward_{kind}" if sampled else f"rasterize_forward_{kind}")
        extra = (pixel_ids,) if sampled else ()
        out_feat, out_alpha, last_ids, sel_ids, sel_count = fwd(
            means2d, conics, features, opacities, backgrounds, width, height, tile_size,
            isect_offsets, flatten_ids, num_quantiles, *extra)
        ctx.config = (width, height, tile_size, num_quantiles, absgrad, kind, backgrounds is not None, sampled)
        ctx.save_for_backward(means2d, conics, features, opacities, backgrounds, isect_offsets,
                              flatten_ids, out_feat, out_alpha, last_ids, sel_ids, sel_count,
                              pixel_ids)
        return out_feat, out_alpha

    @staticmethod
    def backward(ctx, grad_feat, grad_alpha):
        width, height, tile_size, num_quantiles, absgrad, kind, has_bg, sampled = ctx.config
        (means2d, conics, features, opacities, backgrounds, isect_offsets, flatten_ids,
         out_feat, out_alpha, last_ids, sel_ids, sel_count, pixel_ids) = ctx.saved_tensors
        ext = _backend.load_extension(with_cuda=kind == "cuda")
        bwd = getattr(ext, f"rasterize_pixels_backward_{kind}" if sampled else f"rasterize_backward_{kind}")
        extra = (pixel_ids,) if sampled else ()
        g_means, g_conics, g_feat, g_opac, g_bg, g_abs = bwd(
            means2d, conics, features, opacities, backgrounds if has_bg else None, width, height,
            tile_size, isect_offsets, flatten_ids, num_quantiles, out_feat, out_alpha, last_ids,
            sel_ids, sel_count, grad_feat.contiguous(), grad_alpha.contiguous(), absgrad, *extra)
        if absgrad:
            ctx.saved_means2d_absgrad = g_abs  # read by the caller through the hook below
        return (g_means, g_conics, g_feat, g_opac, g_bg if has_bg else None,
                None, None, None, None, None, None, None, None, None)


def _attach_absgrad(means2d: Tensor, output: Tensor) -> None:
    """After backward, copy the kernel's |dL/dmeans2d| onto `means2d.absgrad` (gsplat's field)."""
    node = output.grad_fn

    def hook(*_):
        absgrad = getattr(node, "saved_means2d_absgrad", None)
        if absgrad is not None:
            prev = getattr(means2d, "absgrad", None)
            means2d.absgrad = absgrad if prev is None else prev + absgrad

    node.register_hook(hook)
