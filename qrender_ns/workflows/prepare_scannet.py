"""`qsplat prepare-scannet`: a raw ScanNet `<scene>.sens` -> the `color/ depth/ pose/ intrinsic/` scene folder.

    qsplat prepare-scannet scans/scene0000_00/scene0000_00.sens --out data/scannet/scene0000_00

Every 20th frame at the native colour size by default (OpenGaussian's ScanNet preprocessing; see
`qrender_ns/data/sens.py`), the `<scene>_vh_clean_2.ply` / `.labels.ply` beside the `.sens` copied along.
Streams the file frame by frame, resumes an interrupted run (complete frames are skipped), and reports a
truncated, foreign or empty file in one sentence before writing anything. Options: workflows/options.py (PrepareScannet).
"""

from __future__ import annotations

import sys
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from qrender_ns.data.sens import SensError, export_scannet
from qrender_ns.workflows.options import PrepareScannet


def main(cfg: PrepareScannet) -> None:
    """`qsplat` runs this with the parsed options."""
    out = cfg.out if cfg.out is not None else Path(cfg.sens).parent
    bar = _progress_bar(Path(cfg.sens).name) if cfg.progress and sys.stderr.isatty() else None
    try:
        if bar is not None:
            with bar[0]:
                result = export_scannet(cfg.sens, out, cfg.frame_stride, cfg.image_size, cfg.max_frames,
                                        cfg.overwrite, progress=bar[1])
        else:
            result = export_scannet(cfg.sens, out, cfg.frame_stride, cfg.image_size, cfg.max_frames,
                                    cfg.overwrite)
    except SensError as e:
        raise SystemExit(f"[q-splat] {e}") from None
    except OSError as e:
        raise SystemExit(f"[q-splat] writing {out} failed: {e.strerror or e} ({e.filename or out}).") from None
    speed = f"{result.frames_per_second:.1f} frames/s" if result.written else "nothing to convert"
    w, h = result.color_size
    print(f"[q-splat] {result.out}: {result.written} frames written, {result.skipped} already there (skipped), "
          f"{result.selected} of {result.frames_in_file} frames selected (stride {cfg.frame_stride}), colour "
          f"{w}x{h}; {result.seconds:.1f} s, {speed}.")
    if result.invalid_poses:
        print(f"[q-splat] {result.invalid_poses} selected frames have no valid pose (-inf, lost tracking): "
              f"they are written as ScanNet does and skipped by the ScanNet reader.")
    if result.plys:
        print(f"[q-splat] copied {', '.join(p.name for p in result.plys)}")
    else:
        print(f"[q-splat] no <scene>_vh_clean_2.ply beside {cfg.sens}: pass `qsplat-data --ply-file-path PATH` "
              f"to ns-train, or copy the scene's mesh into {result.out}.")
    print(f"[q-splat] train: ns-train q-splat --data {result.out}")


def _progress_bar(name: str):
    """(rich Progress, callback)."""
    progress = Progress(TextColumn(rf"\[q-splat] {name}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                        transient=True)
    task = progress.add_task("frames", total=None)

    def update(done: int, total: int) -> None:
        progress.update(task, completed=done, total=total)

    return progress, update

