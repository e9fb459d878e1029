"""`qsplat-data`: one dataparser for both scene layouts q-splat reads.

- ScanNet layout (`color/ depth/ pose/ intrinsic/` + `*_vh_clean_2.ply`): nerfstudio's
  `scannet-data` parser, with the PLY found in the scene folder (its default `ply_file_path`
  is a fixed example path, and a missing file silently gives random init).
- nerfstudio layout (`transforms.json` + images): nerfstudio's `nerfstudio-data` parser.
Scenes from `qsplat make-scene` (they carry `gt/scene.json`) additionally get their exact
world frame (no re-centring / re-scaling) and their recorded eval split.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Type

from nerfstudio.data.dataparsers.base_dataparser import DataParser, DataParserConfig, DataparserOutputs

SCANNET_DIRS = ("color", "depth", "pose", "intrinsic")


class SceneLayoutError(ValueError):
    """The data folder is not in a layout q-splat can read."""


def detect_layout(data: Path) -> Literal["scannet", "nerfstudio"]:
    if not data.exists():
        raise SceneLayoutError(
            f"--data {data} does not exist. Pass a scene folder, e.g. one made with "
            f"`qsplat make-scene --out {data}`."
        )
    if (data / "transforms.json").is_file():
        return "nerfstudio"
    present = [d for d in SCANNET_DIRS if (data / d).is_dir()]
    if len(present) == len(SCANNET_DIRS):
        return "scannet"
    raise SceneLayoutError(
        f"{data} is neither a nerfstudio scene (transforms.json + images) nor a ScanNet scene "
        f"(folders {', '.join(SCANNET_DIRS)}; found only: {', '.join(present) or 'none'}). "
        f"Convert it with `ns-process-data`, or generate a test scene with `qsplat make-scene`."
    )


def _check_scannet_counts(data: Path) -> None:
    counts = {d: len([p for p in (data / d).iterdir() if p.is_file()]) for d in ("color", "depth", "pose")}
    if len(set(counts.values())) != 1:
        raise SceneLayoutError(
            f"{data}: ScanNet layout needs one pose and one depth per colour image, found "
            + ", ".join(f"{k}/: {v} files" for k, v in counts.items())
            + ". Images without poses cannot be used; remove them or export the missing poses."
        )
    bad = [p.name for p in (data / "color").iterdir() if not p.stem.isdigit()]
    if bad:
        raise SceneLayoutError(f"{data}/color: ScanNet file names must be integers (0.jpg, 1.jpg, ...), got {bad[:3]}")


def _find_scannet_ply(data: Path) -> Optional[Path]:
    plys = sorted(data.glob("*_vh_clean_2.ply")) or sorted(data.glob("*.ply"))
    return plys[0] if plys else None


@dataclass
class QSplatDataParserConfig(DataParserConfig):
    """Reads ScanNet-layout or nerfstudio-layout scenes (auto-detected)."""

    _target: Type = field(default_factory=lambda: QSplatDataParser)
    data: Path = Path()
    """Scene folder."""
    layout: Literal["auto", "scannet", "nerfstudio"] = "auto"
    """Scene layout; auto looks for transforms.json or the ScanNet folders."""
    ply_file_path: Optional[Path] = None
    """ScanNet layout: seed point cloud (default: the scene's *_vh_clean_2.ply)."""


class QSplatDataParser(DataParser):
    config: QSplatDataParserConfig

    def delegate_config(self):
        data = Path(self.config.data)
        layout = detect_layout(data) if self.config.layout == "auto" else self.config.layout
        generated = (data / "gt" / "scene.json").is_file()
        if layout == "scannet":
            _check_scannet_counts(data)
            if generated:
                from .scene_generator import scannet_parser_config

                return scannet_parser_config(data)
            from nerfstudio.data.dataparsers.scannet_dataparser import ScanNetDataParserConfig

            ply = self.config.ply_file_path or _find_scannet_ply(data)
            if ply is None:
                raise SceneLayoutError(
                    f"{data}: no seed point cloud (*_vh_clean_2.ply) found; pass --pipeline.datamanager."
                    f"dataparser.ply-file-path PATH (nerfstudio would silently start from random points)."
                )
            return ScanNetDataParserConfig(data=data, ply_file_path=Path(ply), load_3D_points=True)
        if generated:
            from .scene_generator import nerfstudio_parser_config

            return nerfstudio_parser_config(data)
        from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig

        return NerfstudioDataParserConfig(data=data, load_3D_points=True)

    def _generate_dataparser_outputs(self, split: str = "train", **kwargs) -> DataparserOutputs:
        outputs = self.delegate_config().setup()._generate_dataparser_outputs(split, **kwargs)
        if not outputs.image_filenames:
            raise SceneLayoutError(f"{self.config.data}: the '{split}' split has no images")
        outputs.metadata["qsplat_scene_root"] = str(Path(self.config.data).resolve())
        return outputs
