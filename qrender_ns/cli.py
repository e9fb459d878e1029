"""`qsplat` command line (tyro subcommands, like nerfstudio's)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Union

import tyro
from typing_extensions import Annotated


@dataclass
class BuildExt:
    """Compile the rasterizer kernels now (otherwise the first render compiles them)."""

    cuda: bool = False
    """Also build the CUDA kernel (needs nvcc; compiles for $TORCH_CUDA_ARCH_LIST)."""
    verbose: bool = False

    def main(self) -> None:
        from .render import _backend

        _backend.load_extension(with_cuda=False, verbose=self.verbose)
        print(f"[q-splat] CPU kernel ready in {_backend.ext_dir()}")
        if self.cuda:
            _backend.load_extension(with_cuda=True, verbose=self.verbose)
            print(f"[q-splat] CUDA kernel ready in {_backend.ext_dir()}")


@dataclass
class RenderDemo:
    """Render generated Gaussians densely and with Q-Render; write PNGs, print the time ratio."""

    out: Path = Path("demo_out/render")
    """Folder for the PNGs and the JSON summary."""
    num_gaussians: int = 20000
    channels: int = 512
    num_quantiles: int = 8
    width: int = 320
    height: int = 240
    seed: int = 0

    def main(self) -> None:
        from .demo import run_demo

        run_demo(self)


@dataclass
class Demo:
    """The whole workflow on CPU: make a scene, extract teacher features, ns-train, ns-eval, query."""

    out: Path = Path("demo_out")
    seed: int = 2
    """Scene seed (2 has a chair, which the demo queries)."""
    num_images: int = 24
    steps: int = 500
    feature_warmup_steps: int = 150
    num_quantiles: int = 10

    def main(self) -> None:
        from .demo_pipeline import run_pipeline_demo

        run_pipeline_demo(self)


from .data.dataset import MakeDataset  # noqa: E402  (imports numpy/cv2 only)
from .data.scene_generator import MakeScene  # noqa: E402  (imports numpy/cv2 only)
from .eval.lerf_ovs import EvalLerfOvs  # noqa: E402
from .eval.report import Report  # noqa: E402
from .eval.scannet3d import EvalScannet  # noqa: E402
from .gsnet.backproject import Backproject  # noqa: E402
from .gsnet.predict import PredictFeatures  # noqa: E402
from .gsnet.train import TrainGSNet  # noqa: E402
from .query_cli import Query  # noqa: E402
from .teachers.extract import ExtractFeatures  # noqa: E402

Commands = Union[
    Annotated[BuildExt, tyro.conf.subcommand("build-ext")],
    Annotated[RenderDemo, tyro.conf.subcommand("demo-render")],
    Annotated[Demo, tyro.conf.subcommand("demo")],
    Annotated[MakeScene, tyro.conf.subcommand("make-scene")],
    Annotated[MakeDataset, tyro.conf.subcommand("make-dataset")],
    Annotated[ExtractFeatures, tyro.conf.subcommand("extract-features")],
    Annotated[Query, tyro.conf.subcommand("query")],
    Annotated[EvalScannet, tyro.conf.subcommand("eval-scannet")],
    Annotated[EvalLerfOvs, tyro.conf.subcommand("eval-lerf-ovs")],
    Annotated[Report, tyro.conf.subcommand("report")],
    Annotated[TrainGSNet, tyro.conf.subcommand("train-gsnet")],
    Annotated[PredictFeatures, tyro.conf.subcommand("predict-features")],
    Annotated[Backproject, tyro.conf.subcommand("backproject")],
]


def _verbs() -> list:
    """The subcommand names of `Commands`, in order."""
    from typing import get_args

    return [m.name for cmd in get_args(Commands) for m in get_args(cmd)[1:] if getattr(m, "name", None)]


def check_verb(argv) -> None:
    """An unknown first word is an error (tyro prints the top-level usage and exits 0 for `VERB --help`)."""
    import sys

    if argv and not argv[0].startswith("-"):
        verbs = _verbs()
        if argv[0] not in verbs:
            import difflib

            close = difflib.get_close_matches(argv[0], verbs, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            print(f"qsplat: unknown command '{argv[0]}'.{hint} Commands: {', '.join(verbs)} (qsplat --help).",
                  file=sys.stderr)
            raise SystemExit(2)  # a usage error, as argparse's


def main() -> None:
    import sys

    from .compat import UnsupportedEnvironment

    check_verb(sys.argv[1:])
    command = tyro.cli(Commands)
    try:
        command.main()
    except UnsupportedEnvironment as e:  # a too old torch: its sentence, not a traceback
        raise SystemExit(f"[q-splat] {e}") from None


if __name__ == "__main__":
    main()
