"""Print a markdown table of a rasterize_<device>.json (for docs/results.md)."""

import json
import sys
from pathlib import Path


def main(path: str, channels: int = 512) -> None:
    data = json.loads(Path(path).read_text())
    print("| N | mode | fwd ms | fwd+bwd ms | x dense (fwd) | per-pixel bound | blended n / selected k | cos vs normalised dense |")
    print("|---|---|---|---|---|---|---|---|")
    for r in data["results"]:
        if r.get("channels") != channels or r["mode"] not in ("dense", "quantile"):
            continue
        k = r["num_quantiles"]
        both = r.get("forward_backward_ms")
        cells = [f"{r['num_gaussians']:.0e}", "dense" if k is None else f"K={k}", f"{r['forward_ms']:.0f}",
                 "" if both is None else f"{both:.0f}"]
        if k is None:
            cells += ["", "", "", ""]
        else:
            cells += [f"{r['speedup_vs_dense_forward']:.1f}", f"{r['per_pixel_bound']:.1f}",
                      f"{r['mean_blended_per_pixel_dense']:.1f} / {r['mean_selected_per_pixel']:.1f}",
                      f"{r['mean_cosine_vs_normalised_dense']:.3f}"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:]))
