"""The real viewer page in headless Chromium: `ns-viewer` on a trained generated scene, a query typed into the
"Query (relevancy)" box, the `relevancy` output picked in "Output type", and the image that comes back scored
against the scene's ground-truth class map (the first view is training camera 0, so pixels correspond).

Needs Debian's `chromium` (installed here with apt-get when missing and possible) and Playwright's Python
client (the `test` extra); it never runs `playwright install`. Slow (~3-4 min on 2 shared cores): `make test-all`.
Screenshots land in $QSPLAT_BROWSER_SHOTS (default: the test's tmp folder).
"""

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1000, "height": 700}


def _find_chromium():
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def chromium():
    """Path of Debian's chromium; apt-installs it when missing (as root with apt-get), else skips."""
    path = _find_chromium()
    if path is None and shutil.which("apt-get") and os.geteuid() == 0:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], env=env, capture_output=True, timeout=1200)
        path = _find_chromium()
    if path is None:
        pytest.skip("no chromium browser: `apt-get install chromium` (Debian) to run the viewer browser test")
    return path


@pytest.fixture(scope="module")
def playwright_api():
    return pytest.importorskip("playwright.sync_api",
                               reason="Playwright's Python client is missing: pip install '.[test]' (or playwright)")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from qrender_ns.data.dataparser import QSplatDataParserConfig
    from qrender_ns.data.scene_generator import generate_scene
    from qrender_ns.teachers.synthetic import SyntheticTeacher
    from test_method import make_config, train

    root = tmp_path_factory.mktemp("browser") / "room"
    # seed 33: its first training view (the viewer's first view) shows the chair near the centre (156 of its 440
    # pixels in columns 18-45; the viewer shows about columns 13-51 left of its panel)
    generate_scene(root, layout="scannet", seed=33, num_images=12, width=64, height=48, num_eval=2)
    SyntheticTeacher(root).run(progress=False)
    config = make_config(root, tmp_path_factory.mktemp("runs"), steps=150)
    trainer, _ = train(config, 150)
    first = QSplatDataParserConfig(data=root).setup().get_dataparser_outputs("train").image_filenames[0]
    gt = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(root / "gt" / "classes" / f"{first.stem}.png"))
    return dict(config_path=config.get_base_dir() / "config.yml", gt_classes=gt, root=root,
                pipeline=trainer.pipeline)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def viewer_url(run):
    port = _free_port()
    log = open(run["root"].parent / "ns-viewer.log", "w")
    proc = subprocess.Popen([str(BIN / "ns-viewer"), "--load-config", str(run["config_path"]),
                             "--viewer.websocket-host", "127.0.0.1", "--viewer.websocket-port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            assert proc.poll() is None, (run["root"].parent / "ns-viewer.log").read_text()[-3000:]
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(1)
        else:
            pytest.fail("ns-viewer did not open its port in 300 s")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _turbo_inverse(image: np.ndarray) -> np.ndarray:
    """Scores in [0, 1] of an RGB image drawn with nerfstudio's default float colormap (nearest LUT entry)."""
    from nerfstudio.utils.colormaps import apply_float_colormap

    lut = apply_float_colormap(torch.linspace(0, 1, 256)[:, None], colormap="default").numpy() * 255  # [256, 3]
    pixels = image.reshape(-1, 3).astype(np.float32)
    nearest = np.concatenate([((chunk[:, None] - lut[None]) ** 2).sum(-1).argmin(-1)
                              for chunk in np.array_split(pixels, max(1, len(pixels) // 20000))])
    return (nearest / 255.0).reshape(image.shape[:2])


def _canvas_shot(page, path: Path) -> np.ndarray:
    from PIL import Image

    page.locator("canvas").first.screenshot(path=str(path))
    return np.asarray(Image.open(path).convert("RGB"))


def _wait_for_new_stable_image(page, before: np.ndarray, path: Path, timeout: float = 300,
                               visible_width: int = 10**6) -> np.ndarray:
    """Poll the canvas until its view (left of the panel, which changes on its own) differs from `before` and two
    shots 2 s apart agree (the static render)."""
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        time.sleep(2)
        shot = _canvas_shot(page, path)
        view = shot[:, :visible_width].astype(int)
        changed = before is None or shot.shape != before.shape or np.abs(view - before[:, :visible_width]).mean() > 8
        if changed and last is not None and shot.shape == last.shape and np.abs(view - last[:, :visible_width]).mean() < 0.5:
            return shot
        last = shot
    pytest.fail(f"the viewer image did not settle within {timeout} s (last shot: {path})")


def _canvas_to_view(shape, visible_width: int, zoom: float, dx: float, dy: float, step: int = 1):
    """Visible canvas pixels (left of the control panel) and where they land in the canvas frame of a reference
    render (`zoom` about the centre, then a shift): (rows, cols, reference rows, reference cols)."""
    Hc, Wc = shape[:2]
    v, u = np.mgrid[0:Hc:step, 0:visible_width:step]
    x = (u + 0.5 - Wc / 2) * zoom + Wc / 2 + dx
    y = (v + 0.5 - Hc / 2) * zoom + Hc / 2 + dy
    return v.ravel(), u.ravel(), y.ravel(), x.ravel()


def _register(shot: np.ndarray, reference: np.ndarray, visible_width: int):
    """Best (correlation, zoom, dx, dy) aligning the visible canvas with a reference render of the canvas frame
    (reference [h, w, 3] at 1/4 of the canvas size). The registration absorbs how viser's client fits the view
    into the part of the canvas its panel leaves free."""
    Hc, Wc = shot.shape[:2]
    h, w = reference.shape[:2]
    best = (-2.0, 1.0, 0.0, 0.0)
    for zoom in np.arange(0.5, 1.21, 0.05):
        for dx in range(-300, 301, 20):
            for dy in range(-120, 121, 20):
                rows, cols, y, x = _canvas_to_view(shot.shape, visible_width, zoom, dx, dy, step=4)
                yi, xi = (y * h / Hc).astype(int), (x * w / Wc).astype(int)
                inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
                if inside.mean() < 0.9:
                    continue
                c = np.corrcoef(shot[rows[inside], cols[inside]].ravel(), reference[yi[inside], xi[inside]].ravel())[0, 1]
                if c > best[0]:
                    best = (float(c), float(zoom), float(dx), float(dy))
    return best


def _ground_truth_at(shot_shape, visible_width: int, alignment, gt: np.ndarray):
    """Ground-truth class of each visible canvas pixel, through the alignment with the camera-0 render (whose
    canvas frame has the training camera's vertical fov and centred principal point): (rows, cols, ids)."""
    Hc, Wc = shot_shape[:2]
    H, W = gt.shape
    rows, cols, y, x = _canvas_to_view(shot_shape, visible_width, *alignment[1:])
    yi = np.floor(y * H / Hc).astype(int)
    xi = np.floor(W / 2 + (x - Wc / 2) * H / Hc).astype(int)
    inside = (xi >= 0) & (xi < W) & (yi >= 0) & (yi < H)
    return rows[inside], cols[inside], gt[yi[inside], xi[inside]]


def _render_like_the_canvas(model, camera, canvas_hw, scale: float = 0.25) -> np.ndarray:
    """RGB [h, w, 3] in 0..255 that `model` renders from `camera`'s pose with the canvas's aspect and the camera's
    vertical fov (what nerfstudio's viewer shows for that pose), at `scale` of the canvas size."""
    from nerfstudio.cameras.cameras import Cameras

    h, w = int(canvas_hw[0] * scale), int(canvas_hw[1] * scale)
    f = (h / 2) * float(camera.fy.reshape(-1)[0]) / (float(camera.height.reshape(-1)[0]) / 2)
    view = Cameras(camera_to_worlds=camera.camera_to_worlds.reshape(1, 3, 4), fx=f, fy=f, cx=w / 2, cy=h / 2,
                   width=w, height=h).to(model.device)
    model.eval()
    with torch.no_grad():
        rgb = model.get_outputs_for_camera(view)["rgb"]
    return rgb.cpu().numpy() * 255


def _panel_left(page, canvas_box) -> int:
    """Canvas column where viser's control panel (drawn over the canvas, on the right) starts."""
    left = page.evaluate("""() => Math.min(...[...document.querySelectorAll('.mantine-Paper-root')]
        .map(e => e.getBoundingClientRect()).filter(r => r.width > 200 && r.height > 300).map(r => r.left))""")
    return int(min(left, canvas_box["x"] + canvas_box["width"]) - canvas_box["x"])


def test_query_in_the_browser_highlights_the_chair(chromium, playwright_api, run, viewer_url, tmp_path):
    from PIL import Image

    from qrender_ns.data.scene_generator import CLASS_NAMES

    shots = Path(os.environ.get("QSPLAT_BROWSER_SHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    gt = run["gt_classes"]
    chair_id = 1 + CLASS_NAMES.index("chair")
    assert (gt[:, 18:46] == chair_id).sum() > 100, "the first training view of this scene should show the chair"
    start = time.time()
    with playwright_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=chromium,
                                                       headless=True, args=CHROMIUM_ARGS, viewport=VIEWPORT)
        page = context.new_page()
        try:
            page.goto(viewer_url)
            # viser labels its inputs with <label for=id>, but its text input carries no id: find it next to the label
            box = page.locator("xpath=//label[normalize-space()='Query (relevancy)']/../../..//input")
            box.wait_for(timeout=120_000)

            # 3. the first view is training camera 0: the canvas shows what the model renders from it, and less
            # so from the training camera farthest from it
            rgb = _wait_for_new_stable_image(page, None, shots / "1_first_view.png")
            panel_x = _panel_left(page, page.locator("canvas").first.bounding_box())
            cameras = run["pipeline"].datamanager.train_dataset.cameras
            far = int((cameras.camera_to_worlds[:, :, 3] - cameras.camera_to_worlds[0, :, 3]).norm(dim=-1).argmax())
            aligned = {}
            for index in (0, far):
                expected = _render_like_the_canvas(run["pipeline"].model, cameras[index], rgb.shape[:2])
                Image.fromarray(expected.clip(0, 255).astype(np.uint8)).save(shots / f"1_model_render_camera{index}.png")
                aligned[index] = _register(rgb.astype(float), expected, panel_x)
            print("first view registered on renders of training cameras (corr, zoom, dx, dy):", aligned)
            assert aligned[0][0] > 0.7 and aligned[0][0] > aligned[far][0] + 0.15, aligned

            # 1. an unknown word is refused next to the box
            box.click()
            box.press_sequentially("zebra", delay=50)
            box.press("Enter")
            page.get_by_text("is not a class of this scene").wait_for(timeout=60_000)

            # 5. a real query (capitalised: matching ignores case), then pick `relevancy` as a user would
            box.fill("")
            box.press_sequentially("Chair", delay=50)
            box.press("Enter")
            page.get_by_text("Relevancy of").wait_for(timeout=60_000)
            output = page.get_by_label("Output type")
            output.click()
            page.get_by_role("option", name="relevancy", exact=True).click()
            heat = _wait_for_new_stable_image(page, rgb, shots / "2_relevancy_chair.png", visible_width=panel_x)
        except BaseException:
            (shots / "page.html").write_text(page.content())
            page.screenshot(path=str(shots / "failure.png"))
            raise
        finally:
            context.close()
    elapsed = time.time() - start

    rows, cols, ids = _ground_truth_at(heat.shape, panel_x, aligned[0], gt)
    score = _turbo_inverse(heat)[rows, cols]
    chair, rest = score[ids == chair_id].mean(), score[(ids != chair_id) & (ids != 0)].mean()
    print(f"browser part {elapsed:.0f} s; first view aligned {aligned}; relevancy (colormap-decoded): chair {chair:.3f}, rest {rest:.3f}")
    assert chair > rest + 0.25, (chair, rest)
