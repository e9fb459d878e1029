"""Fit random 3D Gaussians to a feature image with quantile rendering (Q-Render).

The smallest end-to-end use of q-splat's rasterizer, in the spirit of gsplat's
examples/simple_trainer.py: N Gaussians (means, log-scales, quaternions, opacity logits and a
C-dim feature each) are rendered by `qrender_ns.render.rasterize_features(..., num_quantiles=K)`
through one pinhole camera and optimised with Adam to match a synthetic C-channel target
(a few discs on a background, each region one unit feature vector, as a CLIP-like teacher gives).

    python examples/fit_features.py                        # C=16, K=8, ~300 steps, CPU: seconds
    python examples/fit_features.py --channels 512 --out fit.png

Runs on the GPU when there is one (Triton/CUDA kernels), else on the CPU kernel.
"""

import argparse
import math
import time

import torch
import torch.nn.functional as F

from qrender_ns.render import rasterize_features


def make_target(width, height, channels, num_discs, gen):
    """[H, W, C] unit features: a background region plus overlapping discs, one feature per region."""
    region_feats = F.normalize(torch.randn(num_discs + 1, channels, generator=gen), dim=-1)
    ys, xs = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    labels = torch.zeros(height, width, dtype=torch.long)
    for i in range(1, num_discs + 1):  # later discs paint over earlier ones: some regions touch
        cx, cy = torch.rand(2, generator=gen) * torch.tensor([width, height])
        r = (0.15 + 0.15 * torch.rand(1, generator=gen)) * min(width, height)
        labels[(xs - cx) ** 2 + (ys - cy) ** 2 < r ** 2] = i
    return region_feats[labels]


def init_gaussians(n, channels, fx, width, height, depth, gen):
    """Random Gaussians in the camera frustum at about `depth`, as leaf tensors for Adam."""
    # spread over the visible rectangle at that depth (x = (u - cx) z / fx), a little beyond it
    half = torch.tensor([width / 2 / fx * depth * 1.1, height / 2 / fx * depth * 1.1, 0.3])
    means = (torch.rand(n, 3, generator=gen) * 2 - 1) * half + torch.tensor([0.0, 0.0, depth])
    # initial size ~ the spacing between Gaussians on the image, so the image is covered from step 0
    spacing = 2 * half[0] * math.sqrt(height / width / n)
    params = dict(
        means=means,
        log_scales=torch.full((n, 3), math.log(spacing)),
        quats=F.normalize(torch.randn(n, 4, generator=gen), dim=-1),
        opacity_logits=torch.full((n,), 1.0),  # sigmoid(1) ~ 0.73: opaque enough to cross the quantiles
        features=0.1 * torch.randn(n, channels, generator=gen),
    )
    return {k: v.requires_grad_() for k, v in params.items()}


def render(p, viewmats, Ks, width, height, num_quantiles):
    feats, alphas, meta = rasterize_features(
        p["means"], p["quats"], torch.exp(p["log_scales"]),  # the API wants linear scales
        torch.sigmoid(p["opacity_logits"]), p["features"],  # and opacities in [0, 1]
        viewmats, Ks, width, height, num_quantiles=num_quantiles)
    return feats[0], alphas[0], meta  # one camera: [H, W, C], [H, W, 1]


def metrics(pred, target):
    mse = float(F.mse_loss(pred, target))
    peak = float(target.max() - target.min())  # features are not in [0, 1]: PSNR over the target's range
    psnr = 10 * math.log10(peak ** 2 / max(mse, 1e-12))
    cos = float(F.cosine_similarity(pred, target, dim=-1).mean())
    return mse, psnr, cos


def save_png(path, target, pred):
    """Target | render, projected on the target's 3 principal components (same basis for both)."""
    import numpy as np
    from PIL import Image

    h, w, c = target.shape
    flat = target.reshape(-1, c)
    mean = flat.mean(0)
    basis = torch.linalg.svd(flat - mean, full_matrices=False).Vh[:3].T  # [C, 3]; C >= 3 assumed
    proj = [((x.reshape(-1, c) - mean) @ basis).reshape(h, w, 3) for x in (target, pred)]
    lo, hi = proj[0].amin((0, 1)), proj[0].amax((0, 1))  # scale by the target so colours compare
    rows = [((p - lo) / (hi - lo + 1e-8)).clamp(0, 1) for p in proj]
    gap = torch.ones(h, 2, 3)
    img = (torch.cat([rows[0], gap, rows[1]], dim=1) * 255).byte().numpy()
    Image.fromarray(np.ascontiguousarray(img)).resize((img.shape[1] * 4, h * 4), Image.NEAREST).save(path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--num-gaussians", type=int, default=500)
    ap.add_argument("--channels", type=int, default=16, help="feature dim C (the model uses 512)")
    ap.add_argument("--num-quantiles", type=int, default=8, help="K; 0 = dense alpha blending (V-Render)")
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--height", type=int, default=48)
    ap.add_argument("--lr", type=float, default=1.0, help="multiplies every learning rate below")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write a PNG: target | render (3-channel PCA)")
    args = ap.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator().manual_seed(args.seed)
    width, height = args.width, args.height
    target = make_target(width, height, args.channels, 4, gen).to(device)

    # Pinhole camera at the origin looking down +z (OpenCV axes; viewmats are world-to-camera)
    fx = float(width)
    viewmats = torch.eye(4, device=device)[None]
    Ks = torch.tensor([[fx, 0, width / 2], [0, fx, height / 2], [0, 0, 1]], device=device)[None]
    params = init_gaussians(args.num_gaussians, args.channels, fx, width, height, 3.0, gen)
    params = {k: v.detach().to(device).requires_grad_() for k, v in params.items()}

    # One Adam group per parameter, as gsplat's simple_trainer; means in world units (scene ~2 wide)
    lrs = dict(means=1e-2, log_scales=1e-2, quats=1e-2, opacity_logits=5e-2, features=5e-2)
    opt = torch.optim.Adam([dict(params=[params[k]], lr=lr * args.lr, name=k) for k, lr in lrs.items()])
    # decay to 1/10 by the end (simple_trainer decays the means' lr): late steps refine, not jitter
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.1 ** (1 / max(args.steps, 1)))
    k = args.num_quantiles or None  # None selects the dense path

    losses, t0 = [], time.perf_counter()
    for step in range(args.steps):
        pred, alphas, meta = render(params, viewmats, Ks, width, height, k)
        loss = F.mse_loss(pred, target)  # quantile output is normalised, so no alpha/background term
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % args.log_every == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.6f}  ({meta['backend']} backend)")

    with torch.no_grad():
        pred, _, _ = render(params, viewmats, Ks, width, height, k)
    mse, psnr, cos = metrics(pred, target)
    print(f"done in {time.perf_counter() - t0:.1f}s: mse {mse:.6f}  psnr {psnr:.2f} dB  cosine {cos:.4f}")
    if args.out:
        save_png(args.out, target.cpu(), pred.cpu())
        print(f"wrote {args.out} (left: target, right: render)")
    return dict(losses=losses, mse=mse, psnr=psnr, cosine=cos)


if __name__ == "__main__":
    main()
