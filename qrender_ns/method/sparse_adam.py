"""RowSparseAdam: Adam for a per-Gaussian feature table whose step touches a few rows (issue 27).

A step of the table head renders ~10k sampled pixels, which select at most P*K rows of an [N, 512] table
(qrender_ns.render.rows: the gradient is a sparse COO tensor of those rows). This optimiser updates only those
rows ("lazy" Adam, as torch.optim.SparseAdam, with a step count per row so each row's bias correction is that
of the number of updates it has had): a row that is touched at every step follows torch.optim.Adam exactly
(tests/test_sparse_features.py); a row that is not touched keeps its value and its moments, where dense Adam
would keep moving it along its decaying first moment. Dense gradients update every row (then it is Adam).

State per row, by `moments`:
- "float32": exp_avg and exp_avg_sq [N, C] float32 (Adam exactly; 4 KB per 512-D row);
- "bfloat16": both [N, C] bfloat16 (1 KB each), updated in float32 per gathered row;
- "bfloat16-rowwise": exp_avg [N, C] bfloat16 and one float32 second moment per row (the mean of g^2 over the
  row's channels, as Adam-mini / row-wise AdaGrad for embedding tables): ~1 KB per row;
- "auto": "float32" for a float32 table, "bfloat16-rowwise" for a half-precision one.
plus `row_step` int32 [N]. The table itself is read and written in float32 per chunk of touched rows; a
bfloat16/float16 table is written back with stochastic rounding (`stochastic_rounding`, default on), so updates
below half a unit in the last place still move the row on average.

Densification (gsplat's split / clone / prune) resizes the table: QSplatModel moves this state along with
`remap_rows` (split and clone children start with fresh state, as gsplat gives dense Adam's).
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor

from qrender_ns.utils.memory import huge_page_empty, huge_page_zeros

MOMENTS = ("auto", "float32", "bfloat16", "bfloat16-rowwise")
HALF = (torch.float16, torch.bfloat16)


def feature_table(num_rows: int, channels: int, dtype="bfloat16", scale: float = 0.1,
                  generator: Optional[torch.Generator] = None) -> torch.nn.Parameter:
    """The table head's initial table, N(0, scale^2), stored in `dtype` (drawn in float32 chunk by chunk, so no
    [N, C] float32 copy exists on the way)."""
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    table = huge_page_empty((num_rows, channels), dtype)  # random rows every step: utils/memory.py
    chunk = 1 << 16
    for start in range(0, num_rows, chunk):
        stop = min(start + chunk, num_rows)
        table[start:stop] = torch.randn(stop - start, channels, generator=generator) * scale
    return torch.nn.Parameter(table)


def touched_rows(grad: Optional[Tensor]) -> Tensor:
    """Rows a gradient reached: a row-sparse coalesced COO gradient (the sampled-pixel render's) -> its row ids (the
    rows the loss's pixels selected, which RowSparseAdam updates: O(rows), no scan of the [R, C] values); another
    sparse or a dense [N, C] gradient -> the rows with a nonzero entry; empty for None."""
    if grad is None:
        return torch.zeros(0, dtype=torch.long)
    rows_values = sorted_rows(grad)
    if rows_values is not None:
        return rows_values[0]
    if grad.is_sparse:
        grad = (grad if grad.sparse_dim() == 1 else grad.to_dense().to_sparse(sparse_dim=1)).coalesce()
        rows, values = grad.indices()[0], grad.values()
        return rows[values.abs().amax(dim=-1) > 0] if values.numel() else rows
    return torch.nonzero(grad.detach().abs().amax(dim=-1) > 0).squeeze(-1)


def sorted_rows(grad: Tensor):
    """(row ids [R], values [R, C]) of a row-sparse COO gradient whose row ids are strictly increasing (the
    sampled-pixel render's), without coalesce(): autograd's gradient accumulation drops the coalesced flag the
    render sets, and coalescing again sorts and copies the [R, C] values (O(R log R + R C) per call, twice a step
    at 7e4 rows). None for any other gradient (dense, element-sparse, or rows out of order / repeated)."""
    if not (grad.is_sparse and grad.sparse_dim() == 1):
        return None
    rows = grad._indices()[0]
    if grad.is_coalesced() or bool((rows[1:] > rows[:-1]).all()):
        return rows, grad._values()
    return None


def _round_stochastic(x: Tensor, dtype: torch.dtype, generator=None) -> Tensor:
    """float32 -> bfloat16 with stochastic rounding (unbiased); other dtypes: round to nearest."""
    if dtype != torch.bfloat16:
        return x.to(dtype)
    bits = x.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=x.device, generator=generator)
    finite = torch.isfinite(x)
    rounded = ((bits + noise) & -65536).view(torch.float32)
    return torch.where(finite, rounded, x).to(dtype)  # exact: the low 16 bits are zero


class RowSparseAdam(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, moments: str = "auto",
                 stochastic_rounding: bool = True, chunk_rows: int = 8192):
        if moments not in MOMENTS:
            raise ValueError(f"moments must be one of {MOMENTS}, got {moments!r}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, moments=moments,
                        stochastic_rounding=stochastic_rounding, chunk_rows=chunk_rows)
        super().__init__(params, defaults)

    @staticmethod
    def resolve_moments(moments: str, param: Tensor) -> str:
        if moments != "auto":
            return moments
        return "bfloat16-rowwise" if param.dtype in HALF else "float32"

    def _state(self, param: Tensor, group) -> dict:
        state = self.state[param]
        mode = self.resolve_moments(group["moments"], param)
        rows, channels = param.shape[0], param.shape[1:]
        m_dtype = torch.float32 if mode == "float32" else torch.bfloat16
        if "exp_avg" not in state:
            state["row_step"] = huge_page_zeros((rows,), torch.int32, param.device)
            state["exp_avg"] = huge_page_zeros((rows, *channels), m_dtype, param.device)
            v_shape = (rows,) if mode == "bfloat16-rowwise" else (rows, *channels)
            v_dtype = torch.float32 if mode in ("float32", "bfloat16-rowwise") else torch.bfloat16
            state["exp_avg_sq"] = huge_page_zeros(v_shape, v_dtype, param.device)
        for key in ("row_step", "exp_avg", "exp_avg_sq"):
            if state[key].shape[0] != rows:
                raise RuntimeError(f"RowSparseAdam state {key!r} has {state[key].shape[0]} rows for a parameter of "
                                   f"{rows}: whatever resized the parameter must move its state (remap_rows)")
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad
                ready = sorted_rows(grad)
                if ready is not None:  # the render's row-sparse gradient: rows unique and sorted already
                    rows, values = ready
                elif grad.is_sparse:
                    if grad.sparse_dim() != 1:  # element-sparse (e.g. dense.to_sparse()): as row-sparse
                        grad = grad.to_dense().to_sparse(sparse_dim=1)
                    grad = grad.coalesce()
                    rows, values = grad.indices()[0], grad.values()
                else:
                    rows, values = None, grad
                self._update(param, rows, values, group)
        return loss

    def _update(self, param: Tensor, rows: Optional[Tensor], values: Tensor, group) -> None:
        state = self._state(param, group)
        beta1, beta2 = group["betas"]
        if param.device.type == "cpu" and param.dim() == 2 and group.get("compiled", True):
            from qrender_ns.render import _backend  # the C++ step: one pass per touched row

            ext = _backend.load_extension(with_cuda=False)
            ids = torch.arange(param.shape[0]) if rows is None else rows
            stochastic = param.dtype == torch.bfloat16 and group["stochastic_rounding"]
            self._seed = getattr(self, "_seed", 0) + 1
            ext.row_sparse_adam_cpu(param.data, ids.contiguous(), values.contiguous(), state["exp_avg"],
                                    state["exp_avg_sq"], state["row_step"], float(group["lr"]), float(beta1),
                                    float(beta2), float(group["eps"]), stochastic, self._seed)
            return
        lr, eps, chunk = group["lr"], group["eps"], group["chunk_rows"]
        rowwise = state["exp_avg_sq"].dim() == 1
        count = param.shape[0] if rows is None else rows.numel()
        data = param.data
        for start in range(0, count, chunk):
            stop = min(start + chunk, count)
            idx = torch.arange(start, stop, device=param.device) if rows is None else rows[start:stop]
            g = values[start:stop].float()
            steps = state["row_step"][idx] + 1
            state["row_step"][idx] = steps
            m = state["exp_avg"][idx].float().mul_(beta1).add_(g, alpha=1 - beta1)
            if rowwise:
                v = state["exp_avg_sq"][idx].mul_(beta2).add_(g.square().mean(dim=-1), alpha=1 - beta2)
            else:
                v = state["exp_avg_sq"][idx].float().mul_(beta2).addcmul_(g, g, value=1 - beta2)
            steps64 = steps.double()
            bias1 = 1 - torch.pow(beta1, steps64)
            bias2_sqrt = torch.sqrt(1 - torch.pow(beta2, steps64))
            shape = (-1,) + (1,) * (g.dim() - 1)
            step_size = (lr / bias1).float().reshape(shape)
            denom = (v.sqrt().reshape(shape if rowwise else v.shape) / bias2_sqrt.float().reshape(shape)).add_(eps)
            new = data[idx].float().addcdiv_(m * step_size, denom, value=-1.0)
            if data.dtype in HALF and group["stochastic_rounding"]:
                data[idx] = _round_stochastic(new, data.dtype)
            else:
                data[idx] = new.to(data.dtype)
            state["exp_avg"][idx] = m.to(state["exp_avg"].dtype)
            state["exp_avg_sq"][idx] = v.to(state["exp_avg_sq"].dtype)

    def remap_rows(self, old: Tensor, new: Tensor, source: Tensor) -> None:
        """`old` was replaced by `new` (densification): new row i takes old row source[i]'s state, or fresh
        state where source[i] < 0 (split / clone children, as gsplat's ops give dense Adam's state)."""
        state = self.state.pop(old, None)
        for group in self.param_groups:
            group["params"] = [new if p is old else p for p in group["params"]]
        if not state or "exp_avg" not in state:
            return
        fresh = source < 0
        take = source.clamp(min=0)
        moved = {}
        for key in ("row_step", "exp_avg", "exp_avg_sq"):
            value = huge_page_empty((take.numel(), *state[key].shape[1:]), state[key].dtype, state[key].device)
            torch.index_select(state[key], 0, take, out=value)
            value[fresh] = 0
            moved[key] = value
        self.state[new] = moved

    def load_state_dict(self, state_dict) -> None:
        # torch casts floating state to the parameter's dtype on load: ours keeps its own dtypes (int32 step
        # counts, bfloat16 / float32 moments of a bfloat16 table)
        dtypes = {pid: {k: v.dtype for k, v in st.items() if isinstance(v, Tensor)}
                  for pid, st in state_dict["state"].items()}
        super().load_state_dict(state_dict)
        saved_ids = [pid for group in state_dict["param_groups"] for pid in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for pid, param in zip(saved_ids, params):
            for key, dtype in dtypes.get(pid, {}).items():
                self.state[param][key] = self.state[param][key].to(dtype)


def state_bytes_per_row(channels: int, table_dtype: torch.dtype, moments: str) -> float:
    """Bytes a row of the table and its RowSparseAdam state take (for the docs' memory table)."""
    mode = RowSparseAdam.resolve_moments(moments, torch.empty(0, dtype=table_dtype))
    table = channels * torch.empty(0, dtype=table_dtype).element_size()
    m = channels * (4 if mode == "float32" else 2)
    v = {"float32": 4 * channels, "bfloat16": 2 * channels, "bfloat16-rowwise": 4}[mode]
    return float(table + m + v + 4 + 1)  # + row_step, + the supervised flag



@contextlib.contextmanager
def rows_follow_densification(optimizer, params, name: str):
    """Within: gsplat's split / clone / prune of `params` (its strategy ops) resize params[name]; on exit the
    RowSparseAdam state follows the rows as gsplat moves dense Adam's (kept rows keep theirs, appended children
    start fresh). gsplat rewrites every optimiser state tensor with torch.cat against float32 zeros, which would
    promote bfloat16 moments to float32 [N, C] at a time: it gets a 1-based row provenance instead (0 for the rows
    it appends), and the moments are gathered once afterwards."""
    param = params[name]
    if not isinstance(optimizer, RowSparseAdam):
        yield
        return
    saved = optimizer.state.pop(param, {})
    optimizer.state[param] = {"qsplat_source": torch.arange(1, param.shape[0] + 1, dtype=torch.float64,
                                                            device=param.device)}
    try:
        yield
    finally:
        new = params[name]
        source = optimizer.state.pop(new, {}).get("qsplat_source")
        optimizer.state[param] = saved
        if new is not param:
            optimizer.remap_rows(param, new, source.long() - 1)
