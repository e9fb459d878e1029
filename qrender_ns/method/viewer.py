"""The q-splat panel of the nerfstudio viewer (viser): a text query, its status line, the `relevancy` output,
and the first view.

- The query box applies a query on submit, not on every keystroke. viser 0.2.7's text input (the client
  nerfstudio 1.1.5 ships) sends its value on every keystroke and nothing on Enter, so "submit" is: the text
  has not changed for `submit_delay` seconds (typing a word then pressing Enter, or pausing, applies it), or the
  "Run query" button. Keystrokes only store the pending text: no relevancy is computed for "cha" on the way to
  "chair" and the view does not re-render per key.
- Text is matched after `teachers.text.normalize_text` ("Chair", " chair " = "chair"). A query the teacher
  cannot answer (empty; not a class name with the closed-vocabulary synthetic teacher) is refused in the
  status line next to the box, and the map stays neutral: never a heat map for a word the model does not know.
- `relevancy` is an output of every non-training render, so the "Output type" dropdown always lists it: a
  neutral (all-zero) map while no query is applied; applying a query selects it.
- Pixels whose rendered feature is exactly zero (only never-supervised Gaussians, whose features are zero,
  or nothing at all) get relevancy 0: the map says nothing where the model learned nothing.
- A new browser tab starts at the first training camera (pose and vertical field of view) instead of viser's
  default pose.
"""

from __future__ import annotations

import math
import threading
from typing import TYPE_CHECKING, Callable, Dict, Optional

import numpy as np
import torch
from nerfstudio.viewer.viewer import VISER_NERFSTUDIO_SCALE_RATIO
from nerfstudio.viewer.viewer_elements import ViewerButton, ViewerControl, ViewerElement, ViewerText

from qrender_ns.features.relevancy import relevancy_from_cosines
from qrender_ns.teachers.vocabulary import normalize_text, vocabulary_error

if TYPE_CHECKING:  # pragma: no cover
    from viser import ViserServer

RELEVANCY_OUTPUT = "relevancy"
SUBMIT_DELAY_S = 0.8
HINT = "Type a word, e.g. a class name ('chair'), then press Enter (or pause): the 'relevancy' output shows it."


class QueryBox(ViewerText):
    """A text field whose callback (`cb_hook`, which nerfstudio wraps with its train lock and a re-render) runs
    once per submitted text instead of once per keystroke."""

    def __init__(self, name: str, on_submit: Callable[["QueryBox"], None], submit_delay: float = SUBMIT_DELAY_S,
                 hint: Optional[str] = None):
        super().__init__(name, default_value="", cb_hook=on_submit, hint=hint)
        self.submit_delay = float(submit_delay)
        self._timer: Optional[threading.Timer] = None
        self._lock = threading.Lock()

    def install(self, viser_server: "ViserServer") -> None:
        self._create_gui_handle(viser_server)
        assert self.gui_handle is not None
        self.gui_handle.on_update(lambda _: self.on_keystroke())  # not cb_hook: see the class docstring

    def on_keystroke(self) -> None:
        """Restart the submit countdown (the last keystroke wins)."""
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = threading.Timer(self.submit_delay, self.submit)
            self._timer.daemon = True
            self._timer.start()

    def submit(self) -> None:
        with self._lock:
            self._timer = None
        self.cb_hook(self)


class ViewerMarkdown(ViewerElement[str]):
    """A line of markdown in the viewer panel (the query's status)."""

    def __init__(self, name: str, content: str):
        super().__init__(name)
        self.content = content

    def _create_gui_handle(self, viser_server: "ViserServer") -> None:
        self.gui_handle = viser_server.gui.add_markdown(self.content)

    def install(self, viser_server: "ViserServer") -> None:
        self._create_gui_handle(viser_server)

    def set_content(self, content: str) -> None:
        self.content = content
        if self.gui_handle is not None:
            self.gui_handle.content = content


class QSplatViewerControl(ViewerControl):
    """Access to the running viewer (nerfstudio calls `_setup` once it is built): selects the relevancy
    output and puts each new browser tab at a training camera."""

    viewer = None

    def _setup(self, viewer) -> None:
        super()._setup(viewer)
        self.viser_server.on_client_connect(self._start_at_training_camera)

    def select_output(self, name: str) -> bool:
        """Select `name` in the "Output type" dropdown, as a user would (its callbacks re-render)."""
        panel = getattr(self.viewer, "control_panel", None)
        dropdown = getattr(panel, "_output_render", None)
        if dropdown is None or name not in (dropdown.options or []):
            return False
        if dropdown.value != name:
            dropdown.value = name
        return True

    def _start_at_training_camera(self, client) -> None:
        try:
            cameras = self.viewer.pipeline.datamanager.train_dataset.cameras
        except AttributeError:
            return
        if len(cameras) == 0:
            return
        pose = viser_pose_of_camera(cameras[0])
        # Message order matters to the browser: its orbit controls animate a position change relative to the
        # current target, and a target change or an up-direction change during that animation bends the final
        # pose. So: up direction first, then a target that viser's position setter (which shifts the target by the
        # position's offset) turns into the wanted one just before the position itself is sent.
        with client.atomic():
            client.camera.up_direction = pose["up_direction"]
            client.camera.look_at = pose["look_at"] - pose["position"] + np.asarray(client.camera.position)
            client.camera.position = pose["position"]
            client.camera.fov = pose["fov"]
        self.viewer.current_camera_idx = 0


def viser_pose_of_camera(camera) -> Dict[str, np.ndarray]:
    """viser camera state (position, wxyz, up_direction, look_at, vertical fov in radians) that makes nerfstudio's
    viewer render exactly what `camera` (one nerfstudio Cameras, OpenGL convention) sees (the inverse of
    nerfstudio.viewer.viewer.Viewer.get_camera_state). The orbit target is straight ahead, as far as the world
    origin (the scene centre after nerfstudio's normalisation) is from the camera."""
    import viser.transforms as vtf

    c2w = camera.camera_to_worlds.reshape(3, 4).double().cpu().numpy()
    rotation = vtf.SO3.from_matrix(c2w[:3, :3]) @ vtf.SO3.from_x_radians(np.pi)  # OpenGL -> OpenCV axes
    axes = rotation.as_matrix()  # columns: right, down, forward
    position = c2w[:3, 3] * VISER_NERFSTUDIO_SCALE_RATIO
    distance = max(float(np.linalg.norm(position)), 0.1 * VISER_NERFSTUDIO_SCALE_RATIO)
    height = float(camera.height.reshape(-1)[0])
    fy = float(camera.fy.reshape(-1)[0])
    return {"position": position, "wxyz": rotation.wxyz, "up_direction": -axes[:, 1],
            "look_at": position + distance * axes[:, 2], "fov": 2 * math.atan(height / (2 * fy))}


class QueryPanel:
    """The query state of one QSplatModel and its viewer elements (see the module docstring)."""

    def __init__(self, model, submit_delay: float = SUBMIT_DELAY_S):
        self.model = model
        self.text = ""  # the applied (normalised) query; "" = none
        self.message = HINT
        self.box = QueryBox("Query (relevancy)", on_submit=lambda box: self.submit(box.value),
                            submit_delay=submit_delay,
                            hint="Text to localise, e.g. 'chair'; applied on Enter: the 'relevancy' output shows it")
        self.run_button = ViewerButton("Run query", cb_hook=lambda _: self.submit(self.box.value))
        self.status = ViewerMarkdown("Query status", HINT)
        self.control = QSplatViewerControl()

    def submit(self, text: str) -> Optional[str]:
        """Apply a query: returns the refusal message (and applies nothing) when it cannot be answered."""
        query = normalize_text(text)
        error = None
        if query:
            try:
                error = vocabulary_error(query, self.model.text_encoder, self.model.class_names)
            except (RuntimeError, FileNotFoundError, NotImplementedError, ImportError) as e:
                error = f"No text encoder for this run: {e}"
        self.text = query if query and error is None else ""
        if not query:
            self.message = HINT
        elif error:
            self.message = f"**Not shown:** {error}"
        else:
            self.message = f"Relevancy of **{query}** (output '{RELEVANCY_OUTPUT}')."
        self.status.set_content(self.message)
        if self.text and getattr(self.control, "viewer", None) is not None:
            self.control.select_output(RELEVANCY_OUTPUT)
        return error

    def relevancy(self, outputs: Dict[str, torch.Tensor], crop_ids=None) -> torch.Tensor:
        """The `relevancy` output [H, W, 1] of a render: the applied query's map (a query-space render of the
        last projected view), zero where the rendered feature is zero (nothing rendered, or only Gaussians no
        training pixel reached); all zeros (neutral) while no query is applied."""
        rgb = outputs["rgb"]
        if not self.text:
            return torch.zeros((*rgb.shape[:-1], 1), dtype=rgb.dtype, device=rgb.device)

        model = self.model
        negatives = list(model.config.relevancy_negatives)
        scores, alpha = model.render_query_scores(model.text_encoder.encode([self.text, *negatives]), crop_ids)
        rel = relevancy_from_cosines(scores[..., :1], scores[..., None, 1:].expand(*scores.shape[:-1], 1, len(negatives)))
        shown = (alpha > 0) & (scores.abs().amax(-1, keepdim=True) > 0)
        return torch.where(shown, rel, torch.zeros_like(rel)).to(rgb.dtype)
