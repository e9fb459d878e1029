"""The real viewer page in headless Chromium: `ns-viewer` on a trained generated scene, a query typed into the
"Query (relevancy)" box, the `relevancy` output picked in "Output type", and the image that comes back scored
against the scene's ground-truth class map (the first view is training camera 0, so pixels correspond). The images
are read as the page receives them (viser's BackgroundImageMessage on its websocket, see `_Frames`): headless
Chromium's software WebGL keeps showing the first one on the canvas. Canvas screenshots are saved for a look.

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
    log_path = Path(os.environ.get("QSPLAT_BROWSER_SHOTS", run["root"].parent)) / "ns-viewer.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "w")
    proc = subprocess.Popen([str(BIN / "ns-viewer"), "--load-config", str(run["config_path"]),
                             "--viewer.websocket-host", "127.0.0.1", "--viewer.websocket-port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            assert proc.poll() is None, log_path.read_text()[-3000:]
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


class _Frames:
    """The images the page receives: every viser BackgroundImageMessage on the page's websocket, decoded (RGB
    uint8), with its arrival time. Reading them there, not off the canvas: in headless Chromium (SwiftShader WebGL)
    the canvas shows the first background image and then keeps it (WebGL logs "glTexStorage2D: Texture dimensions
    must all be greater than zero" for the later textures), while the page did receive and hand over every later
    image; a browser with a GPU displays them."""

    def __init__(self, page):
        self.page, self.items = page, []
        page.on("websocket", lambda ws: ws.on("framereceived", self._on_frame))

    def _on_frame(self, payload) -> None:
        import io

        import msgpack
        from PIL import Image

        if not isinstance(payload, (bytes, bytearray)):
            return
        try:
            messages = msgpack.unpackb(payload, raw=False, strict_map_key=False)
        except Exception:  # noqa: BLE001 - not every frame is a msgpack list of messages
            return
        for message in messages if isinstance(messages, list) else [messages]:
            if isinstance(message, dict) and message.get("type") == "BackgroundImageMessage":
                image = np.asarray(Image.open(io.BytesIO(message["rgb_bytes"])).convert("RGB"))
                self.items.append((time.time(), image))

    def settled(self, since: float, timeout: float = 300, quiet: float = 4.0, min_pixels: int = 200 * 200,
                differs_from: np.ndarray = None) -> np.ndarray:
        """The last full-resolution image received after `since`, once no image has come for `quiet` seconds (the
        viewer sends low-resolution previews first); with `differs_from`, only an image that differs from it."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            self.page.wait_for_timeout(1000)  # not time.sleep: Playwright's sync API dispatches events only inside its calls
            recent = [(t, im) for t, im in self.items if t > since and im.shape[0] * im.shape[1] >= min_pixels]
            if not recent or time.time() - self.items[-1][0] < quiet:
                continue
            image = recent[-1][1]
            if differs_from is not None and image.shape == differs_from.shape and \
                    np.abs(image.astype(int) - differs_from.astype(int)).mean() < 8:
                continue
            return image
        pytest.fail(f"no settled viewer image within {timeout} s ({len(self.items)} images received)")


def _pixel_ground_truth(shape, gt: np.ndarray, cx: float, cy: float):
    """Ground-truth class of every pixel of a viewer image taken at training camera 0's pose: the viewer renders
    the camera's vertical field of view over the image height, principal point at the image centre."""
    h, w = shape[:2]
    H, W = gt.shape
    v, u = np.mgrid[0:h, 0:w]
    yi = np.floor(cy + (v + 0.5 - h / 2) * H / h).astype(int)
    xi = np.floor(cx + (u + 0.5 - w / 2) * H / h).astype(int)
    inside = (xi >= 0) & (xi < W) & (yi >= 0) & (yi < H)
    return v[inside], u[inside], gt[yi[inside], xi[inside]]


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


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.astype(float).ravel(), b.astype(float).ravel())[0, 1])


def test_query_in_the_browser_highlights_the_chair(chromium, playwright_api, run, viewer_url, tmp_path):
    from PIL import Image

    from qrender_ns.data.scene_generator import CLASS_NAMES

    shots = Path(os.environ.get("QSPLAT_BROWSER_SHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    gt = run["gt_classes"]
    chair_id = 1 + CLASS_NAMES.index("chair")
    assert (gt == chair_id).sum() > 100, "the first training view of this scene should show the chair"
    start = time.time()
    with playwright_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=chromium,
                                                       headless=True, args=CHROMIUM_ARGS, viewport=VIEWPORT)
        page = context.new_page()
        frames = _Frames(page)
        try:
            page.goto(viewer_url)
            # viser labels its inputs with <label for=id>, but its text input carries no id: find it next to the label
            box = page.locator("xpath=//label[normalize-space()='Query (relevancy)']/../../..//input")
            box.wait_for(timeout=120_000)

            # 3. the first view is training camera 0: the image the page gets is what the model renders from it,
            # and not what it renders from the training camera farthest from it
            rgb = frames.settled(0.0)
            Image.fromarray(rgb).save(shots / "1_first_view.png")
            cameras = run["pipeline"].datamanager.train_dataset.cameras
            far = int((cameras.camera_to_worlds[:, :, 3] - cameras.camera_to_worlds[0, :, 3]).norm(dim=-1).argmax())
            match = {}
            for index in (0, far):
                expected = _render_like_the_canvas(run["pipeline"].model, cameras[index], rgb.shape[:2], scale=1.0)
                Image.fromarray(expected.clip(0, 255).astype(np.uint8)).save(shots / f"1_model_render_camera{index}.png")
                match[index] = _corr(rgb, expected)
            print("first view vs renders of training cameras (correlation):", match)
            assert match[0] > 0.9 and match[0] > match[far] + 0.2, match

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
            clicked = time.time()
            heat = frames.settled(clicked - 30, differs_from=rgb)
            Image.fromarray(heat).save(shots / "2_relevancy_chair.png")
            page.screenshot(path=str(shots / "2_page.png"))
        except BaseException:
            (shots / "page.html").write_text(page.content())
            page.screenshot(path=str(shots / "failure.png"))
            raise
        finally:
            context.close()
    elapsed = time.time() - start

    assert heat.shape == rgb.shape
    camera = cameras[0]
    rows, cols, ids = _pixel_ground_truth(heat.shape, gt, float(camera.cx), float(camera.cy))
    score = _turbo_inverse(heat)[rows, cols]
    chair, rest = score[ids == chair_id].mean(), score[(ids != chair_id) & (ids != 0)].mean()
    print(f"browser part {elapsed:.0f} s; {len(frames.items)} images received; relevancy (colormap-decoded): "
          f"chair {chair:.3f}, rest {rest:.3f}")
    assert chair > rest + 0.25, (chair, rest)
