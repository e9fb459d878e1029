"""Viewer panel without a browser: text matching, submit-not-keystroke, refusals, the neutral map, the first
view, and never-supervised Gaussians through densification. The browser drives it in test_viewer_browser.py."""

import math
import threading
import time

import pytest
import torch

from qrender_ns.teachers.synthetic import SyntheticTextEncoder
from qrender_ns.teachers.text import normalize_text, vocabulary_error
from qrender_ns.method.viewer import HINT, QueryPanel, viser_pose_of_camera

CLASSES = ["wall", "floor", "chair", "table"]


def test_normalize_text():
    assert normalize_text("  Dining \t CHAIR\n") == "dining chair"
    assert normalize_text("Ｃｈａｉｒ") == "chair"  # NFKC: full-width letters
    assert normalize_text("   ") == ""


def test_vocabulary_error_is_case_and_whitespace_insensitive():
    encoder = SyntheticTextEncoder(dim=16)
    for ok in ("chair", "Chair", " CHAIR  "):
        assert vocabulary_error(ok, encoder, CLASSES) is None
    for bad in ("zebra", "cha", "chairs"):
        assert "closed-vocabulary" in vocabulary_error(bad, encoder, CLASSES)
    assert "empty" in vocabulary_error("  ", encoder, CLASSES)
    assert torch.equal(encoder.encode(["Chair"]), encoder.encode(["chair"]))

    class Open:  # an open-vocabulary encoder (CLIP) accepts any non-empty word
        name = "grounded-sam2-clip"

    assert vocabulary_error("zebra", Open(), CLASSES) is None


class _FakeModel:
    """What QueryPanel needs from QSplatModel: a text encoder and query-space scores of the last view."""

    def __init__(self):
        self.text_encoder = SyntheticTextEncoder(dim=8)
        self.class_names = CLASSES
        self.config = type("Config", (), {"relevancy_negatives": ("object",)})()
        self.calls = []
        self.features = None  # the last view's (would-be) feature map

    def render_query_scores(self, queries, crop_ids=None):
        self.calls.append(queries.shape[0])
        f = self.features
        cos = torch.nn.functional.normalize(f, dim=-1) @ torch.nn.functional.normalize(queries, dim=-1).T
        return cos, torch.ones(*f.shape[:-1], 1)  # every pixel rendered something (zero: never supervised)


def _features(model):
    f = torch.zeros(2, 3, 8)
    f[0, 0] = model.text_encoder.encode(["chair"])[0]
    f[0, 1] = model.text_encoder.encode(["wall"])[0]
    model.features = f  # the other 4 pixels: zero features (never-supervised Gaussians or nothing)
    return {"rgb": torch.zeros(2, 3, 3)}


def test_refused_queries_show_a_message_and_no_map():
    model = _FakeModel()
    panel = QueryPanel(model)
    outputs = _features(model)
    neutral = panel.relevancy(outputs)  # before any query: the output exists, all zeros
    assert neutral.shape == (2, 3, 1) and not neutral.any() and panel.message == HINT
    for word in ("zebra", "cha"):
        error = panel.submit(word)
        assert error and "closed-vocabulary" in error and "closed-vocabulary" in panel.status.content
        assert panel.text == "" and not panel.relevancy(outputs).any()
    assert model.calls == []  # never rendered a map for them
    assert panel.submit("  Chair ") is None and panel.text == "chair" and "chair" in panel.status.content
    rel = panel.relevancy(outputs)
    assert float(rel[0, 0]) > 0.99 and float(rel[0, 0]) > float(rel[0, 1])
    assert (rel[0, 2:] == 0).all() and (rel[1] == 0).all()  # zero features: no relevancy
    panel.submit("")  # clearing: the output stays, neutral
    assert panel.text == "" and panel.message == HINT and not panel.relevancy(outputs).any()


def test_query_box_submits_once_after_typing_not_per_keystroke():
    submitted = []
    done = threading.Event()
    panel = QueryPanel(_FakeModel(), submit_delay=0.3)
    box = panel.box
    box.cb_hook = lambda element: [submitted.append(element.value), done.set()]  # as nerfstudio's wrapper
    for prefix in ("c", "ch", "cha", "chai", "chair"):
        box.default_value = prefix  # value without a GUI handle
        box.on_keystroke()
        time.sleep(0.02)
    assert submitted == []  # nothing while typing
    assert done.wait(5) and submitted == ["chair"]
    time.sleep(0.4)
    assert submitted == ["chair"]


def test_first_view_is_the_first_training_camera():
    import viser.transforms as vtf
    from nerfstudio.cameras.cameras import Cameras
    from nerfstudio.viewer.viewer import VISER_NERFSTUDIO_SCALE_RATIO

    angle = 0.4
    rot = torch.tensor([[math.cos(angle), 0, math.sin(angle)], [0, 1, 0], [-math.sin(angle), 0, math.cos(angle)]])
    c2w = torch.cat([rot, torch.tensor([[0.3], [-0.2], [1.5]])], dim=1)
    camera = Cameras(camera_to_worlds=c2w[None], fx=50.0, fy=50.0, cx=32.0, cy=24.0, width=64, height=48)[0]
    pose = viser_pose_of_camera(camera)
    # what nerfstudio's Viewer.get_camera_state reads back from the client
    R = (vtf.SO3(wxyz=pose["wxyz"]) @ vtf.SO3.from_x_radians(math.pi)).as_matrix()
    back = torch.cat([torch.tensor(R), torch.tensor(pose["position"] / VISER_NERFSTUDIO_SCALE_RATIO)[:, None]], 1)
    assert torch.allclose(back.float(), c2w, atol=1e-6)
    assert pose["fov"] == pytest.approx(2 * math.atan(24 / 50))
    up = torch.tensor(pose["up_direction"]).float()
    assert torch.allclose(up, c2w[:, 1], atol=1e-6)  # OpenGL camera +Y
    ahead = torch.tensor(pose["look_at"] - pose["position"]).float()
    assert torch.allclose(torch.nn.functional.normalize(ahead, dim=0), -c2w[:, 2], atol=1e-6)  # OpenGL looks down -Z


def test_supervised_flags_follow_densification():
    """The flags ride in splatfacto's strategy_state, which gsplat duplicates, splits and prunes with the
    Gaussians: check that assumption on gsplat's own ops."""
    from gsplat.strategy.ops import duplicate, remove, split

    from qrender_ns.method.model import FEATURE_PARAM, SUPERVISED_STATE

    n = 6
    params = torch.nn.ParameterDict({
        "means": torch.nn.Parameter(torch.arange(n, dtype=torch.float32)[:, None].repeat(1, 3)),
        "scales": torch.nn.Parameter(torch.zeros(n, 3)), "quats": torch.nn.Parameter(torch.tensor([[1.0, 0, 0, 0]] * n)),
        "opacities": torch.nn.Parameter(torch.zeros(n)),
        FEATURE_PARAM: torch.nn.Parameter(torch.arange(n, dtype=torch.float32)[:, None].repeat(1, 4))})
    optimizers = {k: torch.optim.Adam([p], lr=0.1) for k, p in params.items()}
    flags = torch.tensor([True, False, True, False, False, True])
    state = {"grad2d": None, SUPERVISED_STATE: flags}

    def check():
        ids = params[FEATURE_PARAM][:, 0].long()  # each Gaussian carries its original index
        assert torch.equal(state[SUPERVISED_STATE].bool(), flags[ids]), (ids, state[SUPERVISED_STATE])

    duplicate(params, optimizers, state, torch.tensor([False, True, True, False, False, False]))
    check()
    split(params, optimizers, state, torch.tensor([True, True, False, False, False, False, True, False]))
    check()
    remove(params, optimizers, state, torch.arange(params["means"].shape[0]) % 3 == 0)
    check()
