"""q-splat as a nerfstudio method: `ns-train q-splat` (entry point `qrender_ns.method:qsplat_method`).

config.py (the trainer/pipeline configuration), trainer.py (crash-safe checkpoints), datamanager.py (teacher
masks, depth and ground truth per image), model.py (3DGS + the feature head + Q-Render), viewer.py (the text box),
checkpoint.py (checkpoint files and the start-up checks of ns-eval / ns-viewer).

Importing this package has no side effects: nerfstudio's entry-point load (`qsplat_method` below) is the moment
the plugin runs inside ns-train / ns-eval / ns-viewer, and it applies its start-up actions there, explicitly.
"""


def __getattr__(name: str):
    if name != "qsplat_method":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return _load_method_entry_point()


def _load_method_entry_point():
    """What nerfstudio's method discovery gets: the start-up actions, then the MethodSpecification."""
    from qrender_ns.utils.runtime import restart_ns_train_with_passive_omp

    restart_ns_train_with_passive_omp()  # before nerfstudio goes on (it has loaded torch already)
    from qrender_ns.method import checkpoint
    from qrender_ns.method.config import qsplat_method

    # nerfstudio discovers methods before ns-eval / ns-viewer / ns-render / ns-export read their --load-config:
    # a missing or broken file gets a sentence here instead of a traceback there.
    checkpoint.check_ns_command_line()
    checkpoint.register_safe_globals()  # before ns-eval / ns-viewer torch.load our checkpoints (torch >= 2.6)
    globals()["qsplat_method"] = qsplat_method
    return qsplat_method
