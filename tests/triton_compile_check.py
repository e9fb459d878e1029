"""Compile every Triton kernel variant for an sm_90 GPU without a GPU (run as a script, without
TRITON_INTERPRET): catches what the interpreter cannot, i.e. code Triton's compiler rejects.

    python tests/triton_compile_check.py frontend   # Python -> Triton IR only (seconds)
    python tests/triton_compile_check.py full       # down to a cubin with Triton's ptxas (~1 min)
"""

import os
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from qrender_ns.render.triton import kernels as tk  # noqa: E402

INT_PTRS = {"offsets_ptr", "ids_ptr", "chunk_ptr", "last_ptr", "sel_ptr", "count_ptr"}
FLAGS = dict(FEAT_PER_CAM=False, HAS_BG=True, PIXEL_LIST=False, BLOCK=256, BLOCK_C=32)
CASES = [
    (tk._fwd_dense, FLAGS),
    (tk._fwd_dense, dict(FLAGS, FEAT_PER_CAM=True, HAS_BG=False, PIXEL_LIST=True)),
    (tk._fwd_quantile_select, dict(PIXEL_LIST=False, BLOCK=256)),
    (tk._fwd_quantile_select, dict(PIXEL_LIST=True, BLOCK=256)),
    (tk._fwd_quantile_blend, FLAGS),
    (tk._bwd_dense, dict(FLAGS, ABSGRAD=True)),
    (tk._bwd_quantile, dict(FLAGS, ABSGRAD=True, PIXEL_LIST=True)),
    (tk._fwd_query, dict(FLAGS, QUANTILE=True, USE_DOT=True, BLOCK_Q=16)),
    (tk._fwd_query, dict(FLAGS, QUANTILE=False, USE_DOT=True, BLOCK_Q=16)),
    (tk._fwd_query, dict(FLAGS, QUANTILE=False, USE_DOT=False, BLOCK=8, BLOCK_Q=16)),  # tiles < 4x4
]


def source(fn, consts, dtype):
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name == "pix_ptr":
            sig[name] = "*i64"
        elif name.endswith("_ptr"):
            sig[name] = "*i32" if name in INT_PTRS else f"*{dtype}"
        else:
            sig[name] = "i32"
    return ASTSource(fn=fn, signature=sig, constexprs=consts)


def frontend(src, target):
    from triton._C.libtriton import ir
    from triton.compiler.compiler import make_backend

    backend = make_backend(target)
    options = backend.parse_options({})
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    return src.make_ir(target, options, backend.get_codegen_implementation(options), backend.get_module_map(),
                       context)


def main(mode):
    target = GPUTarget("cuda", 90, 32)
    for dtype in ("fp32", "fp64"):
        for fn, consts in CASES:
            t0 = time.time()
            if dtype == "fp64" and not tk.FP64_DOT:  # as the launcher: no tl.dot on float64 before Triton 3.5
                consts = {**consts, "USE_DOT": False} if "USE_DOT" in consts else consts
            src = source(fn, consts, dtype)
            frontend(src, target) if mode == "frontend" else triton.compile(src, target=target)
            print(f"ok {mode} {dtype} {fn.__name__} {consts} {time.time() - t0:.1f}s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "frontend")
