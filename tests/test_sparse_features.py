"""Row-sparse features (issue 27): the sparse_grad render equals the dense one (values and gradients), the
row-sparse Adam equals torch's Adam on the touched rows and leaves the others alone, its state follows gsplat's
densification as dense Adam's does, and whole-view renders from gathered rows equal the whole-table ones."""

import pytest
import torch

from qrender_ns.method.sparse_adam import RowSparseAdam, feature_table, rows_follow_densification, touched_rows
from qrender_ns.render import rasterize_query_scores, rasterize_to_pixels
from qrender_ns.render.rows import compact_view
from scenes import make_scene


def _pixels(scene, num_cams, count, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, num_cams * scene.height * scene.width, (count,), generator=gen)
    return torch.cat([ids, ids[:5]])


def _grads(scene, features, pid, k, backend, sparse, bg, seed=1):
    geometry = [t.detach().clone().requires_grad_() for t in (scene.means2d, scene.conics, scene.opacities)]
    feats = features.detach().clone().requires_grad_()
    bgr = bg.clone().requires_grad_()
    args = list(scene.args(feats))
    args[0], args[1], args[3] = geometry
    out, alpha = rasterize_to_pixels(*args, backgrounds=bgr, num_quantiles=k, backend=backend, pixel_ids=pid,
                                     sparse_grad=sparse)
    gen = torch.Generator().manual_seed(seed)
    (out * torch.randn(out.shape, generator=gen, dtype=out.dtype)).sum().add(
        (alpha * torch.randn(alpha.shape, generator=gen, dtype=out.dtype)).sum()).backward()
    return out, alpha, [g.grad for g in geometry], feats.grad, bgr.grad


@pytest.mark.parametrize("num_quantiles", [1, 4, 10])
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_sparse_grad_render_equals_reference(num_quantiles, backend):
    scene = make_scene(num_cams=2, num_gs=90, width=37, height=29, channels=16, seed=num_quantiles)
    bg = torch.rand(2, 16, dtype=scene.means2d.dtype)
    pid = _pixels(scene, 2, 300)
    ref = _grads(scene, scene.features, pid, num_quantiles, "torch", False, bg)
    new = _grads(scene, scene.features, pid, num_quantiles, backend, True, bg)
    torch.testing.assert_close(new[0], ref[0], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(new[1], ref[1], atol=2e-6, rtol=1e-6)
    for g_new, g_ref in zip(new[2], ref[2]):
        torch.testing.assert_close(g_new, g_ref, atol=1e-4, rtol=1e-4)
    assert new[3].is_sparse
    torch.testing.assert_close(new[3].to_dense(), ref[3], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(new[4], ref[4], atol=1e-5, rtol=1e-5)
    touched = new[3].coalesce().indices()[0]
    assert set(touched.tolist()) == set(torch.nonzero(ref[3].abs().amax(-1) > 0).squeeze(-1).tolist())


def test_half_precision_table_upcasts_gathered_rows():
    scene = make_scene(num_cams=1, num_gs=120, width=40, height=32, channels=32, seed=3)
    pid = _pixels(scene, 1, 200)
    table = scene.features.to(torch.bfloat16)
    ref, ref_alpha = rasterize_to_pixels(*scene.args(table.to(scene.means2d.dtype)), num_quantiles=8, backend="torch",
                                         pixel_ids=pid)
    feats = table.clone().requires_grad_()
    out, alpha = rasterize_to_pixels(*scene.args(feats), num_quantiles=8, pixel_ids=pid, sparse_grad=True)
    assert out.dtype == scene.means2d.dtype
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)  # same rows, accumulated in the geometry's dtype
    out.sum().backward()
    assert feats.grad.is_sparse and feats.grad.dtype == torch.bfloat16


def test_sparse_grad_needs_quantiles_and_pixels():
    scene = make_scene(num_cams=1, num_gs=20, channels=4)
    with pytest.raises(ValueError, match="sparse_grad"):
        rasterize_to_pixels(*scene.args(), num_quantiles=None, pixel_ids=torch.arange(5), sparse_grad=True)
    with pytest.raises(ValueError, match="sparse_grad"):
        rasterize_to_pixels(*scene.args(), num_quantiles=4, sparse_grad=True)


@pytest.mark.parametrize("compiled", [True, False])
def test_row_sparse_adam_equals_dense_adam_on_touched_rows(compiled):
    """Through the real render: the same sampled pixels every step, so the touched rows are touched at every
    step (then lazy Adam is Adam exactly); the other rows never move (as under dense Adam, whose moments stay 0)."""
    scene = make_scene(num_cams=1, num_gs=150, width=48, height=40, channels=24, seed=5, dtype=torch.float32)
    pid = _pixels(scene, 1, 120, seed=2)
    init = scene.features.float().clone()
    dense = torch.nn.Parameter(init.clone())
    sparse = torch.nn.Parameter(init.clone())
    opt_dense = torch.optim.Adam([dense], lr=0.01, eps=1e-15)
    opt_sparse = RowSparseAdam([sparse], lr=0.01, eps=1e-15, moments="float32")
    opt_sparse.param_groups[0]["compiled"] = compiled
    target = torch.randn(pid.numel(), 24, generator=torch.Generator().manual_seed(0))
    rows = None
    for _ in range(5):
        for table, opt, flag in ((dense, opt_dense, False), (sparse, opt_sparse, True)):
            out, _ = rasterize_to_pixels(*scene.args(table), num_quantiles=6, pixel_ids=pid, sparse_grad=flag)
            ((out - target) ** 2).sum().backward()
            if flag:
                assert table.grad.is_sparse
                rows = touched_rows(table.grad)
            opt.step()
            opt.zero_grad(set_to_none=True)
    untouched = torch.ones(150, dtype=torch.bool)
    untouched[rows] = False
    assert 0 < rows.numel() < 150 and untouched.any()
    torch.testing.assert_close(sparse.detach()[rows], dense.detach()[rows], atol=1e-6, rtol=1e-5)
    assert torch.equal(sparse.detach()[untouched], init[untouched])
    assert torch.equal(dense.detach()[untouched], init[untouched])
    assert (opt_sparse.state[sparse]["row_step"][rows] == 5).all()
    assert (opt_sparse.state[sparse]["row_step"][untouched] == 0).all()


def test_lazy_rows_keep_their_state_and_count_their_own_steps():
    table = torch.nn.Parameter(torch.zeros(6, 4))
    opt = RowSparseAdam([table], lr=0.1, moments="float32")
    for rows in ([0, 1], [1, 2], [1]):
        ids = torch.tensor(rows)
        table.grad = torch.sparse_coo_tensor(ids[None], torch.ones(len(rows), 4), (6, 4), check_invariants=True)
        opt.step()
    assert opt.state[table]["row_step"].tolist() == [1, 3, 1, 0, 0, 0]
    assert torch.equal(table.detach()[3:], torch.zeros(3, 4))


@pytest.mark.parametrize("moments", ["bfloat16", "bfloat16-rowwise"])
def test_compiled_step_equals_torch_step_in_reduced_precision(moments):
    gen = torch.Generator().manual_seed(0)
    init = feature_table(40, 16, "bfloat16", generator=gen).detach()
    tables = [torch.nn.Parameter(init.clone()) for _ in range(2)]
    opts = [RowSparseAdam([t], lr=0.01, moments=moments, stochastic_rounding=False) for t in tables]
    opts[1].param_groups[0]["compiled"] = False
    for step in range(4):
        ids = torch.randperm(40, generator=gen)[:15].sort().values
        values = torch.randn(15, 16, generator=gen).to(torch.bfloat16)
        for t, o in zip(tables, opts):
            t.grad = torch.sparse_coo_tensor(ids[None], values, (40, 16))
            o.step()
    torch.testing.assert_close(tables[0].detach().float(), tables[1].detach().float(), atol=0, rtol=0)
    for key in ("exp_avg", "exp_avg_sq", "row_step"):
        assert opts[0].state[tables[0]][key].dtype == opts[1].state[tables[1]][key].dtype
        # bfloat16 moments: the two round g*g at different points, one unit in the last place (2^-8) apart
        torch.testing.assert_close(opts[0].state[tables[0]][key].float(), opts[1].state[tables[1]][key].float(),
                                   atol=1e-9, rtol=2 ** -7)


def test_stochastic_rounding_is_unbiased():
    table = torch.nn.Parameter(torch.ones(2000, 64, dtype=torch.bfloat16))
    opt = RowSparseAdam([table], lr=1e-3, moments="bfloat16-rowwise")  # a step of 1e-3 < half a bf16 ulp at 1
    table.grad = torch.ones(2000, 64, dtype=torch.bfloat16)
    opt.step()
    assert abs(float(table.detach().float().mean()) - (1 - 1e-3)) < 1e-4
    rounded = torch.nn.Parameter(torch.ones(10, 64, dtype=torch.bfloat16))
    opt2 = RowSparseAdam([rounded], lr=1e-3, moments="bfloat16-rowwise", stochastic_rounding=False)
    rounded.grad = torch.ones(10, 64, dtype=torch.bfloat16)
    opt2.step()
    assert torch.equal(rounded.detach(), torch.ones(10, 64, dtype=torch.bfloat16))  # round to nearest loses it


def test_state_follows_gsplat_densification_as_dense_adams():
    from gsplat.strategy.ops import duplicate, remove, split

    gen = torch.Generator().manual_seed(0)
    n, c = 30, 8

    def params():
        g = torch.Generator().manual_seed(1)
        return {"means": torch.nn.Parameter(torch.randn(n, 3, generator=g)),
                "scales": torch.nn.Parameter(torch.randn(n, 3, generator=g) - 2),
                "quats": torch.nn.Parameter(torch.randn(n, 4, generator=g)),
                "clip_features": torch.nn.Parameter(torch.randn(n, c, generator=g))}

    dense_params, sparse_params = params(), params()
    dense_opt = torch.optim.Adam([dense_params["clip_features"]], lr=0.01)
    sparse_opt = RowSparseAdam([sparse_params["clip_features"]], lr=0.01, moments="float32")
    for _ in range(2):  # every row touched: the two states are equal before densifying
        grad = torch.randn(n, c, generator=gen)
        dense_params["clip_features"].grad = grad.clone()
        sparse_params["clip_features"].grad = grad.to_sparse()
        dense_opt.step()
        sparse_opt.step()
    masks = [torch.rand(n, generator=gen) < 0.3 for _ in range(3)]
    for ps, feature_opt in ((dense_params, dense_opt), (sparse_params, sparse_opt)):
        opts = {name: torch.optim.Adam([p], lr=0.01) for name, p in ps.items() if name != "clip_features"}
        opts["clip_features"] = feature_opt
        ctx = rows_follow_densification(opts["clip_features"], ps, "clip_features")
        with ctx:
            torch.manual_seed(3)
            duplicate(ps, opts, {}, masks[0])
            m = ps["means"].shape[0]
            split(ps, opts, {}, torch.cat([masks[1], torch.zeros(m - n, dtype=torch.bool)]))
            keep = ps["means"].shape[0]
            remove(ps, opts, {}, torch.rand(keep, generator=torch.Generator().manual_seed(4)) < 0.2)
    new_dense, new_sparse = dense_params["clip_features"], sparse_params["clip_features"]
    torch.testing.assert_close(new_sparse.detach(), new_dense.detach(), atol=1e-6, rtol=1e-5)
    dense_state, sparse_state = dense_opt.state[new_dense], sparse_opt.state[new_sparse]
    torch.testing.assert_close(sparse_state["exp_avg"], dense_state["exp_avg"], atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(sparse_state["exp_avg_sq"], dense_state["exp_avg_sq"], atol=1e-9, rtol=1e-6)
    fresh = dense_state["exp_avg"].abs().amax(-1) == 0
    assert fresh.any() and (~fresh).any()
    assert (sparse_state["row_step"][fresh] == 0).all() and (sparse_state["row_step"][~fresh] == 2).all()
    assert sparse_state["exp_avg"].dtype == torch.float32 and sparse_opt.param_groups[0]["params"][0] is new_sparse


def test_state_dict_round_trip_keeps_dtypes():
    table = feature_table(10, 4, "bfloat16")
    opt = RowSparseAdam([table], lr=0.01)
    table.grad = torch.ones(10, 4, dtype=torch.bfloat16).to_sparse()
    opt.step()
    other = RowSparseAdam([table], lr=0.01)
    other.load_state_dict(opt.state_dict())
    dtypes = {k: v.dtype for k, v in other.state[table].items()}
    assert dtypes == {"row_step": torch.int32, "exp_avg": torch.bfloat16, "exp_avg_sq": torch.float32}


@pytest.mark.parametrize("num_quantiles", [None, 5])
def test_compact_view_render_equals_whole_table(num_quantiles):
    scene = make_scene(num_cams=1, num_gs=200, width=50, height=40, channels=8, seed=7)
    full, alpha = rasterize_to_pixels(*scene.args(), num_quantiles=num_quantiles, backend="cpu")
    rows, (m2, co, op, fl) = compact_view(scene.means2d, scene.conics, scene.opacities, scene.flatten_ids)
    args = list(scene.args(scene.features[rows]))
    args[0], args[1], args[3], args[8] = m2, co, op, fl
    compact, compact_alpha = rasterize_to_pixels(*args, num_quantiles=num_quantiles, backend="cpu")
    assert rows.numel() < 200 or True
    torch.testing.assert_close(compact, full, atol=0, rtol=0)
    torch.testing.assert_close(compact_alpha, alpha, atol=0, rtol=0)
    queries = torch.randn(3, 8, dtype=scene.means2d.dtype)
    s_full, _ = rasterize_query_scores(*scene.args(), queries, num_quantiles=num_quantiles, backend="cpu")
    s_compact, _ = rasterize_query_scores(*args, queries, num_quantiles=num_quantiles, backend="cpu")
    torch.testing.assert_close(s_compact, s_full, atol=1e-6, rtol=1e-6)


def test_selection_walks_tiles_in_order_and_returns_pixels_in_theirs():
    """select_pixels hands the kernel its samples grouped by tile (cache reuse along a tile's list) and returns the
    picks in the caller's order: the compiled walk's picks equal the torch oracle's for shuffled, repeated ids."""
    from qrender_ns.render.rows import select_pixels, tile_major_order

    scene = make_scene(num_cams=2, num_gs=120, width=40, height=36, channels=8, seed=3, dtype=torch.float32)
    pid = _pixels(scene, 2, 300, seed=4)
    order = tile_major_order(pid, scene.width, scene.height, 16)
    assert torch.equal(torch.sort(order).values, torch.arange(pid.numel()))
    tiles = ((pid // (scene.width * scene.height)) * 3 + (pid % (scene.width * scene.height)) // scene.width // 16) \
        * 3 + (pid % scene.width) // 16
    assert (tiles[order][1:] >= tiles[order][:-1]).all()
    args = scene.args(scene.features)
    geometry = (args[0], args[1], args[3], scene.width, scene.height, 16, args[7], args[8], pid, 6)
    assert torch.equal(select_pixels(*geometry, "cpu"), select_pixels(*geometry, "torch"))


def test_touched_rows_of_a_row_sparse_gradient_are_its_ids_without_a_value_scan():
    grad = torch.sparse_coo_tensor(torch.tensor([[1, 4, 7]]), torch.tensor([[1.0, 0], [0, 0], [0, -2]]), (9, 2))
    assert touched_rows(grad.coalesce()).tolist() == [1, 4, 7]  # the rows the render wrote (row 4: a zero row)
    assert touched_rows(grad.to_dense()).tolist() == [1, 7]
    assert touched_rows(None).numel() == 0


def test_unvalidated_values_skip_the_scans_over_the_intersections():
    """validate_values=False (the model's training renders) reads no value of N or of the intersections; the
    default still rejects opacities outside [0, 1]; index ranges are checked either way."""
    scene = make_scene(num_cams=1, num_gs=30, width=24, height=20, channels=4, seed=1, dtype=torch.float32)
    args = list(scene.args(scene.features))
    args[3] = args[3] * 3
    pid = _pixels(scene, 1, 20)
    with pytest.raises(ValueError, match="must lie in"):
        rasterize_to_pixels(*args, num_quantiles=4, pixel_ids=pid)
    rasterize_to_pixels(*args, num_quantiles=4, pixel_ids=pid, validate_values=False, sparse_grad=True)
    bad_ids = list(scene.args(scene.features))
    bad_ids[8] = bad_ids[8].clone()
    bad_ids[8][0] = 10_000
    with pytest.raises(ValueError, match="flatten_ids"):
        rasterize_to_pixels(*bad_ids, num_quantiles=4, pixel_ids=pid, validate_values=False, sparse_grad=True)


@pytest.mark.parametrize("training", [False, True])
def test_feature_chunks_equal_gaussian_features(training):
    """QSplatModel.gaussian_feature_chunks (the 3D protocols', selection's and export's reader): blocks of
    gaussian_features (upcast, outside training masked by the supervised flags), without the [N, D] copy."""
    from types import SimpleNamespace

    from qrender_ns.method.model import FEATURE_PARAM, QSplatModel

    table = feature_table(23, 6, "bfloat16", generator=torch.Generator().manual_seed(0))
    supervised = torch.rand(23, generator=torch.Generator().manual_seed(1)) > 0.4
    model = SimpleNamespace(config=SimpleNamespace(feature_head="table"), gauss_params={FEATURE_PARAM: table},
                            training=training, feature_supervised=supervised, _check_supervised=lambda t: None)
    whole = QSplatModel.gaussian_features.fget(model).detach()
    for chunk in (1, 5, 23, 64):
        blocks = list(QSplatModel.gaussian_feature_chunks(model, chunk))
        assert [start for start, _ in blocks] == list(range(0, 23, chunk))
        assert all(rows.dtype == torch.float32 for _, rows in blocks)
        assert torch.equal(torch.cat([rows for _, rows in blocks]), whole)


def test_rows_render_equals_the_whole_table_render():
    """rasterize_pixels_of_rows (features computed for the selected rows only): the same values and gradients as
    the sampled-pixel render of the whole table, and it asks for each selected row once."""
    from qrender_ns.render import rasterize_pixels_of_rows

    scene = make_scene(num_cams=1, num_gs=90, width=32, height=28, channels=6, seed=7, dtype=torch.float32)
    pid = _pixels(scene, 1, 80, seed=5)
    weight = torch.randn(6, 6, generator=torch.Generator().manual_seed(0), requires_grad=True)
    base = scene.features.float()
    ref, ref_alpha = rasterize_to_pixels(*scene.args(base @ weight), num_quantiles=5, pixel_ids=pid)
    g_ref, = torch.autograd.grad(ref.square().sum(), weight)
    asked = []

    def features_of(rows):
        asked.append(rows)
        return base[rows] @ weight

    args = scene.args(base)
    out, alpha = rasterize_pixels_of_rows(args[0], args[1], features_of, args[3], *args[4:9], pid, 5)
    g_out, = torch.autograd.grad(out.square().sum(), weight)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(alpha, ref_alpha)
    torch.testing.assert_close(g_out, g_ref)
    assert len(asked) == 1 and torch.equal(asked[0], torch.unique(asked[0])) and asked[0].numel() < 90


def test_gsnet_predicts_rows_equal_to_its_whole_prediction():
    from qrender_ns.gsnet.gsnet import GSNet, GSNetConfig

    gen = torch.Generator().manual_seed(0)
    means = torch.rand(300, 3, generator=gen)
    colors, opac = torch.rand(300, 3, generator=gen), torch.rand(300, generator=gen)
    rows = torch.tensor([0, 3, 17, 150, 299])
    for mlp in (32, 0):
        net = GSNet(GSNetConfig(voxel_size=0.2, feature_dim=16, stem_channels=8, enc_channels=(8, 8, 8, 8),
                                dec_channels=(8, 8, 8, 8), gaussian_mlp_channels=mlp, head_channels=16,
                                backend="torch")).eval()
        with torch.no_grad():
            torch.testing.assert_close(net(means, colors, opac, rows=rows), net(means, colors, opac)[rows])


def test_sorted_rows_skip_coalesce_only_when_rows_are_unique_and_sorted():
    from qrender_ns.method.sparse_adam import sorted_rows

    values = torch.arange(6.0).reshape(3, 2)
    ok = torch.sparse_coo_tensor(torch.tensor([[1, 4, 7]]), values, (9, 2))
    assert not ok.is_coalesced()  # as autograd leaves the render's gradient
    rows, vals = sorted_rows(ok)
    assert rows.tolist() == [1, 4, 7] and torch.equal(vals, values)
    assert sorted_rows(torch.sparse_coo_tensor(torch.tensor([[4, 1, 4]]), values, (9, 2))) is None
    assert sorted_rows(values) is None
    table = torch.nn.Parameter(torch.zeros(9, 2))
    table.grad = torch.sparse_coo_tensor(torch.tensor([[4, 1, 4]]), values, (9, 2))
    RowSparseAdam([table], lr=0.1, moments="float32").step()  # repeated rows: summed by coalesce, as before
    assert (table.detach()[[1, 4]] != 0).all() and (table.detach()[[0, 2, 3, 5, 6, 7, 8]] == 0).all()


@pytest.mark.parametrize("table_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_cpu_blend_equals_gather_and_embedding_bag(table_dtype):
    """The C++ blend of the touched rows (rows read in the table's dtype) against the torch path it replaces on the
    CPU: values, the table's row-sparse gradient (in the table's dtype) and the weights' gradient."""
    import torch.nn.functional as F

    from qrender_ns.render.rows import _BlendRowsCpu, gather_rows

    gen = torch.Generator().manual_seed(5)
    table = (torch.randn(300, 40, generator=gen) * 0.3).to(table_dtype)
    touched = torch.randperm(300, generator=gen)[:70].sort().values
    slot = torch.randint(0, 70, (90, 6), generator=gen)
    slot[torch.rand(90, 6, generator=gen) < 0.2] = -1  # pixels that picked fewer than K
    weights = torch.rand(90, 6, generator=gen)
    grad_out = torch.randn(90, 40, generator=gen)

    def run(fused):
        t, w = table.clone().requires_grad_(), weights.clone().requires_grad_()
        if fused:
            out = _BlendRowsCpu.apply(t, touched, slot, w)
        else:
            rows = gather_rows(t, touched, torch.float32)
            out = F.embedding_bag(slot.clamp(min=0), rows, per_sample_weights=w * (slot >= 0), mode="sum")
        (out * grad_out).sum().backward()
        return out, t.grad, w.grad

    out, g_table, g_w = run(True)
    ref_out, ref_table, ref_w = run(False)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_w, ref_w, atol=1e-5, rtol=1e-5)
    assert g_table.is_sparse and g_table.dtype == table_dtype
    assert torch.equal(g_table._indices()[0], touched)
    half_ulp = {torch.float32: 1e-5, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}[table_dtype]
    torch.testing.assert_close(g_table.to_dense().float(), ref_table.to_dense().float(), atol=1e-5, rtol=half_ulp)
