"""Make q-splat checkpoints loadable with torch >= 2.6 (`torch.load` defaults to weights_only).

nerfstudio's ns-eval / ns-viewer call `torch.load(path)` without `weights_only=False`, and a
nerfstudio checkpoint holds numpy float64 learning rates (ExponentialDecayScheduler's
`_last_lr`, optimizer param groups): loading fails with "Unsupported global:
numpy.core.multiarray.scalar". register_safe_globals() (called by the
method's entry point, which nerfstudio loads before it loads a checkpoint, and by our own loaders) allow-lists
exactly these plain-data numpy types; no code-executing global is added.
"""

from __future__ import annotations

import pickle
import re
import sys
import uuid
import zipfile
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch
import yaml

from qrender_ns.utils.fsio import atomic_write, exit_on_write_error, probe_writable


def numpy_scalar_globals() -> list:
    try:
        from numpy.core.multiarray import scalar
    except ImportError:  # numpy >= 2 moved it
        from numpy._core.multiarray import scalar
    dtypes = [np.dtype]
    for name in ("Float64DType", "Float32DType", "Int64DType", "Int32DType", "BoolDType"):
        if hasattr(np, "dtypes") and hasattr(np.dtypes, name):
            dtypes.append(getattr(np.dtypes, name))
    return [scalar, *dtypes]


def register_safe_globals() -> None:
    if hasattr(torch.serialization, "add_safe_globals"):
        torch.serialization.add_safe_globals(numpy_scalar_globals())


# ------------------------------------------------------------------------------------------------------------
# Atomic saves and a fallback past a corrupt latest checkpoint (a kill -9 during torch.save truncates it)
# ------------------------------------------------------------------------------------------------------------
_STEP_FILE = re.compile(r"^step-(\d+)\.ckpt$")


def _say(message: str) -> None:
    print(f"[q-splat] {message}", file=sys.stderr, flush=True)


def atomic_torch_save(obj, path: Path) -> None:
    """torch.save into a temporary file beside the checkpoint folder, fsync, then rename over `path`.

    The temporary lives in the folder's parent (the run folder), not among the step-*.ckpt files: nerfstudio
    parses every file name in the checkpoint folder as a step, so a leftover there would break ns-eval."""
    path = Path(path)
    atomic_write(path, lambda f: torch.save(obj, f),
                 tmp_path=path.parent.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.partial")


def atomic_torch_save_or_exit(obj, path: Path) -> None:
    """atomic_torch_save; a full disk or read-only folder becomes a sentence (the older checkpoints are intact)."""
    with exit_on_write_error(path, "the previous checkpoints are intact; resume with --load-dir"):
        atomic_torch_save(obj, path)


def remove_stale_partials(checkpoint_dir: Path) -> None:
    """Temporaries a killed save left in the run folder."""
    for stale in Path(checkpoint_dir).parent.glob(".step-*.ckpt.*.partial"):
        stale.unlink(missing_ok=True)


def checkpoint_steps(checkpoint_dir: Path) -> List[Tuple[int, Path]]:
    """(step, path) of the step-*.ckpt files, newest first."""
    found = []
    for path in Path(checkpoint_dir).iterdir():
        match = _STEP_FILE.match(path.name)
        if match and path.is_file():
            found.append((int(match.group(1)), path))
    return sorted(found, reverse=True)


def checkpoint_problem(path: Path) -> Optional[str]:
    """Why `path` cannot be a complete torch checkpoint (None when it looks complete). torch.save writes a
    zip whose central directory comes last, so a truncated file has none: this reads only the file's end."""
    try:
        with zipfile.ZipFile(path) as z:
            if not any(n.endswith("data.pkl") for n in z.namelist()):
                return "not a torch checkpoint (no data.pkl)"
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        return f"unreadable, probably truncated by a killed save ({type(e).__name__}: {e})"
    return None


def latest_loadable_step(checkpoint_dir: Path, load: Optional[Callable[[int, Path], object]] = None):
    """(step, path, result of load(step, path)) of the newest step-*.ckpt that is complete and, when `load` is
    given, loads without error; every file skipped is named on stderr together with the step used instead.
    SystemExit with a sentence when none can be used."""
    register_safe_globals()
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise SystemExit(f"[q-splat] no checkpoint folder at {checkpoint_dir}: the run saved no checkpoint yet "
                         "(nerfstudio saves every --steps-per-save steps and at the end of training)")
    candidates = checkpoint_steps(checkpoint_dir)
    skipped = []
    for step, path in candidates:
        problem = checkpoint_problem(path)
        result = None
        if problem is None and load is not None:
            try:
                result = load(step, path)
            except (RuntimeError, EOFError, OSError, KeyError, ValueError, pickle.UnpicklingError) as e:
                problem = f"failed to load ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        if problem is None:
            if skipped:
                _say(f"using step {step} ({path.name}) instead of the newer checkpoint(s) skipped above")
            return step, path, result
        skipped.append(path)
        _say(f"skipping checkpoint {path}: {problem}")
    what = f"all {len(candidates)} step-*.ckpt files are unreadable" if candidates else "it holds no step-*.ckpt file"
    raise SystemExit(f"[q-splat] no usable checkpoint in {checkpoint_dir}: {what}. Re-train, or resume from "
                     "another run with --load-dir")


def install_eval_fallback() -> None:
    """Make nerfstudio's eval_load_checkpoint (ns-eval, ns-viewer, our commands) skip a corrupt latest
    checkpoint of a q-splat run, naming it and the step used; other methods go to nerfstudio's code unchanged.
    Called once nerfstudio.utils.eval_utils is fully imported (QSplatTrainerConfig.get_checkpoint_dir, which
    eval_setup calls right before it loads)."""
    register_safe_globals()
    from nerfstudio.utils import eval_utils  # not at import: nerfstudio imports this module while eval_utils loads

    original = eval_utils.eval_load_checkpoint
    if getattr(original, "_qsplat_fallback", False):
        return

    def eval_load_checkpoint(config, pipeline):
        if getattr(config, "method_name", None) != "q-splat" or config.load_step is not None:
            return original(config, pipeline)

        def load(step, path):
            config.load_step = step
            return original(config, pipeline)

        try:
            _, _, result = latest_loadable_step(config.load_dir, load)
        finally:
            config.load_step = None
        return result

    eval_load_checkpoint._qsplat_fallback = True
    eval_utils.eval_load_checkpoint = eval_load_checkpoint


# ------------------------------------------------------------------------------------------------------------
# ns-eval: check --output-path before the evaluation, not after it
# ------------------------------------------------------------------------------------------------------------
def ns_eval_output_path(argv: List[str]) -> Optional[Path]:
    """ns-eval's --output-path from its command line (its default output.json when absent); None when the
    program is not ns-eval."""
    if not argv or Path(argv[0]).name not in ("ns-eval", "eval.py"):
        return None
    return _option_path(argv, "output-path") or Path("output.json")


def _option_path(argv: List[str], name: str) -> Optional[Path]:
    """The value of `--name VALUE` / `--name=VALUE` (dashes or underscores, as tyro accepts) in argv, or None."""
    spellings = (f"--{name}", f"--{name.replace('-', '_')}")
    for i, arg in enumerate(argv[1:], start=1):
        if arg in spellings and i + 1 < len(argv):
            return Path(argv[i + 1])
        if arg.startswith(tuple(f"{s}=" for s in spellings)):
            return Path(arg.split("=", 1)[1])
    return None


def check_output_path(path: Path) -> None:
    """SystemExit with a sentence unless a .json file can be written at `path` (creating its folder as
    ns-eval does); leaves nothing behind but that folder."""
    path = Path(path)
    if path.suffix != ".json":
        raise SystemExit(f"[q-splat] ns-eval --output-path {path}: must end in .json")
    if path.is_dir():
        raise SystemExit(f"[q-splat] ns-eval --output-path {path} is a folder: give a file name ending in .json")

    try:
        probe_writable(path.parent)
    except OSError as e:
        raise SystemExit(f"[q-splat] ns-eval cannot write --output-path {path} ({e.strerror or e}): pick a writable "
                         "place; checked before the evaluation so that no work is lost") from None


# Programs of nerfstudio that read a run's --load-config (nerfstudio imports the plugin, i.e. this module, while
# it discovers methods: before it reads that file).
NS_LOAD_CONFIG_PROGRAMS = ("ns-eval", "ns-viewer", "ns-render", "ns-export")


def ns_load_config(argv: List[str]) -> Optional[Tuple[str, Path]]:
    """(program, --load-config path) when `argv` is one of NS_LOAD_CONFIG_PROGRAMS with that option, else None."""
    if not argv or Path(argv[0]).name not in NS_LOAD_CONFIG_PROGRAMS:
        return None
    path = _option_path(argv, "load-config")
    return (Path(argv[0]).name, path) if path is not None else None


def check_ns_load_config(program: str, config_path: Path) -> None:
    """SystemExit with a sentence when nerfstudio's `program` is given a --load-config that is missing, a folder,
    unreadable or not YAML (nerfstudio would print a traceback). Any method's run passes: only the file is checked,
    its syntax parsed without constructing the objects it names."""
    check_config_file(Path(config_path), f"[q-splat] {program}",
                      "pass the config.yml that ns-train wrote (outputs/<scene>/<method>/<timestamp>/config.yml)")


def check_config_file(config_path: Path, command: str, hint: str) -> str:
    """The text of a --load-config file; SystemExit with a sentence when it is a folder, missing, unreadable or
    not YAML (syntax only: the objects it names are not constructed)."""
    if config_path.is_dir():
        inside = config_path / "config.yml"
        more = f" (did you mean {inside}?)" if inside.is_file() else ""
        raise SystemExit(f"{command}: --load-config {config_path} is a folder{more}: {hint}")
    if not config_path.is_file():
        raise SystemExit(f"{command}: --load-config {config_path} does not exist: {hint}")
    try:
        text = config_path.read_text()
        for _ in yaml.parse(text):
            pass
    except (OSError, UnicodeDecodeError) as e:
        raise SystemExit(f"{command}: cannot read --load-config {config_path} ({e}): {hint}") from None
    except yaml.YAMLError as e:
        raise SystemExit(f"{command}: --load-config {config_path} is not valid YAML ({str(e).splitlines()[0]}): "
                         f"{hint}") from None
    return text


def check_ns_command_line(argv: Optional[List[str]] = None) -> None:
    """At plugin import: the --load-config of ns-eval / ns-viewer / ns-render / ns-export (check_ns_load_config)."""
    found = ns_load_config(sys.argv if argv is None else argv)
    if found is not None:
        check_ns_load_config(*found)


def preflight() -> None:
    """What the plugin checks before nerfstudio's eval_setup loads anything: install the checkpoint fallback
    and, under ns-eval, the output path."""
    register_safe_globals()
    install_eval_fallback()
    output = ns_eval_output_path(sys.argv)
    if output is not None:
        check_output_path(output)


# ------------------------------------------------------------------------------------------------------------
# --load-config of our commands: a sentence for a missing file, invalid YAML or another method's run
# ------------------------------------------------------------------------------------------------------------
def check_run_config(config_path: Path, command: str = "qsplat") -> None:
    """SystemExit with a sentence unless `config_path` is the config.yml of a q-splat run."""
    register_safe_globals()

    config_path = Path(config_path)
    text = check_config_file(config_path, command, "pass the config.yml that ns-train q-splat wrote "
                                                   "(outputs/<scene>/q-splat/<time>/config.yml)")
    try:
        config = yaml.load(text, Loader=yaml.Loader)
    except (ImportError, AttributeError, TypeError) as e:
        raise SystemExit(f"{command}: --load-config {config_path} names code that is not installed here "
                         f"({type(e).__name__}: {e})") from None
    method = getattr(config, "method_name", None)
    if method != "q-splat":
        what = f"a '{method}' run" if method else "not a nerfstudio run config"
        raise SystemExit(f"{command}: --load-config {config_path} is {what}; this command reads q-splat runs "
                         "(trained with ns-train q-splat)")
