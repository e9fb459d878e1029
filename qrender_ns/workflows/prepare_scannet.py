"""`qsplat prepare-scannet`: a raw ScanNet `<scene>.sens` -> the `color/ depth/ pose/ intrinsic/` scene folder.

    qsplat prepare-scannet scans/scene0000_00/scene0000_00.sens --out data/scannet/scene0000_00

Every 20th frame at the native colour size by default (OpenGaussian's ScanNet preprocessing; see
`qrender_ns/data/sens.py`), the `<scene>_vh_clean_2.ply` / `.labels.ply` beside the `.sens` copied along.
Streams the file frame by frame, resumes an interrupted run (complete frames are skipped), and reports a
truncated, foreign or empty file in one sentence before writing anything. Import-light: numpy, and cv2/PIL
when it runs.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import tyro

DEFAULT_FRAME_STRIDE = 20  # = qrender_ns.data.sens.DEFAULT_FRAME_STRIDE (kept literal: --help imports nothing else)


@dataclass
class PrepareScannet:
    """Convert a raw ScanNet .sens file into the scene layout `ns-train q-splat --data` reads."""

    sens: tyro.conf.Positional[Path]
    """The ScanNet <scene>.sens file (its <scene>_vh_clean_2.ply and .labels.ply beside it are copied too)."""
    out: Optional[Path] = None
    """Scene folder to write color/ depth/ pose/ intrinsic/ into (default: the folder holding the .sens)."""
    frame_stride: int = DEFAULT_FRAME_STRIDE
    """Keep every Nth frame (20: OpenGaussian / OpenScene's frame_skip; 1 keeps all); names keep the frame index."""
    image_size: Optional[Tuple[int, int]] = None
    """WIDTH HEIGHT of the written colour images (default: native, 1296 968 for ScanNet; intrinsics are scaled)."""
    max_frames: Optional[int] = None
    """Stop after this many selected frames (default: all)."""
    overwrite: bool = False
    """Replace an earlier export in --out (otherwise it is resumed, and other settings are refused)."""
    progress: bool = True
    """Show a progress bar (rich) on a terminal."""

    def main(self) -> None:
        from qrender_ns.data.sens import SensError, export_scannet

        out = self.out if self.out is not None else Path(self.sens).parent
        bar = _progress_bar(Path(self.sens).name) if self.progress and sys.stderr.isatty() else None
        try:
            if bar is not None:
                with bar[0]:
                    result = export_scannet(self.sens, out, self.frame_stride, self.image_size, self.max_frames,
                                            self.overwrite, progress=bar[1])
            else:
                result = export_scannet(self.sens, out, self.frame_stride, self.image_size, self.max_frames,
                                        self.overwrite)
        except SensError as e:
            raise SystemExit(f"[q-splat] {e}") from None
        except OSError as e:
            raise SystemExit(f"[q-splat] writing {out} failed: {e.strerror or e} ({e.filename or out}).") from None
        speed = f"{result.frames_per_second:.1f} frames/s" if result.written else "nothing to convert"
        w, h = result.color_size
        print(f"[q-splat] {result.out}: {result.written} frames written, {result.skipped} already there (skipped), "
              f"{result.selected} of {result.frames_in_file} frames selected (stride {self.frame_stride}), colour "
              f"{w}x{h}; {result.seconds:.1f} s, {speed}.")
        if result.invalid_poses:
            print(f"[q-splat] {result.invalid_poses} selected frames have no valid pose (-inf, lost tracking): "
                  f"they are written as ScanNet does and skipped by the ScanNet reader.")
        if result.plys:
            print(f"[q-splat] copied {', '.join(p.name for p in result.plys)}")
        else:
            print(f"[q-splat] no <scene>_vh_clean_2.ply beside {self.sens}: pass `qsplat-data --ply-file-path PATH` "
                  f"to ns-train, or copy the scene's mesh into {result.out}.")
        print(f"[q-splat] train: ns-train q-splat --data {result.out}")


def _progress_bar(name: str):
    """(rich Progress, callback) or None when rich is not installed."""
    try:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    except ImportError:
        return None
    progress = Progress(TextColumn(f"[q-splat] {name}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                        transient=True)
    task = progress.add_task("frames", total=None)

    def update(done: int, total: int) -> None:
        progress.update(task, completed=done, total=total)

    return progress, update


def entrypoint() -> None:
    tyro.cli(PrepareScannet).main()


if __name__ == "__main__":
    entrypoint()
