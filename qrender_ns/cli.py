"""`qsplat` command line (tyro subcommands, like nerfstudio's): this module only assembles the verbs.

Each verb's options are a dataclass in an import-light options module (workflows/options.py, eval/options.py,
data/scene_generator) whose `main()` imports the verb's code (its one lazy import), so `qsplat --help` loads
no nerfstudio.
"""

from __future__ import annotations

import difflib
import sys
from typing import List, Union, get_args

import tyro
from typing_extensions import Annotated

from qrender_ns.utils.compat import UnsupportedEnvironment
from qrender_ns.utils.runtime import prefer_passive_omp


def commands():
    """The verbs as one tyro subcommand union. Assembled on call: `main` first sets OMP_WAIT_POLICY, which
    libgomp reads once, when the options' imports (GS-Net's config) load torch."""
    from qrender_ns.data.scene_generator import MakeScene
    from qrender_ns.eval.options import EvalLerfOvs, EvalScannet, Report
    from qrender_ns.workflows.options import (Backproject, BuildExt, Demo, Export, ExtractFeatures, MakeDataset,
                                              PredictFeatures, PrepareScannet, Query, RenderDemo, TrainGSNet)

    return Union[
        Annotated[BuildExt, tyro.conf.subcommand("build-ext")],
        Annotated[RenderDemo, tyro.conf.subcommand("demo-render")],
        Annotated[Demo, tyro.conf.subcommand("demo")],
        Annotated[MakeScene, tyro.conf.subcommand("make-scene")],
        Annotated[MakeDataset, tyro.conf.subcommand("make-dataset")],
        Annotated[PrepareScannet, tyro.conf.subcommand("prepare-scannet")],
        Annotated[ExtractFeatures, tyro.conf.subcommand("extract-features")],
        Annotated[Query, tyro.conf.subcommand("query")],
        Annotated[Export, tyro.conf.subcommand("export")],
        Annotated[EvalScannet, tyro.conf.subcommand("eval-scannet")],
        Annotated[EvalLerfOvs, tyro.conf.subcommand("eval-lerf-ovs")],
        Annotated[Report, tyro.conf.subcommand("report")],
        Annotated[TrainGSNet, tyro.conf.subcommand("train-gsnet")],
        Annotated[PredictFeatures, tyro.conf.subcommand("predict-features")],
        Annotated[Backproject, tyro.conf.subcommand("backproject")],
    ]


def _verbs() -> List[str]:
    """The subcommand names of `Commands`, in order."""
    return [m.name for cmd in get_args(commands()) for m in get_args(cmd)[1:] if getattr(m, "name", None)]


def check_verb(argv) -> None:
    """An unknown first word is an error (tyro prints the top-level usage and exits 0 for `VERB --help`)."""
    if argv and not argv[0].startswith("-"):
        verbs = _verbs()
        if argv[0] not in verbs:
            close = difflib.get_close_matches(argv[0], verbs, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            print(f"qsplat: unknown command '{argv[0]}'.{hint} Commands: {', '.join(verbs)} (qsplat --help).",
                  file=sys.stderr)
            raise SystemExit(2)  # a usage error, as argparse's


def main() -> None:
    prefer_passive_omp()  # before the verb loads torch's OpenMP (utils/runtime.py)
    check_verb(sys.argv[1:])
    command = tyro.cli(commands())
    try:
        command.main()
    except UnsupportedEnvironment as e:  # a too old torch: its sentence, not a traceback
        raise SystemExit(f"[q-splat] {e}") from None


if __name__ == "__main__":
    main()
