"""Furniture catalogue: per-class sizes and colours, part builders, surface appearance draws."""

from __future__ import annotations

from typing import Callable, Dict, List, Tuple

import numpy as np

from qrender_ns.data.scene_generator.scene import Surface

# Per class: footprint length (local x), depth (local y), height ranges in metres, and part colours.
_OBJECT_SIZES = {
    "chair": ((0.45, 0.55), (0.45, 0.55), (0.8, 1.0)),
    "table": ((0.9, 1.3), (0.6, 0.9), (0.7, 0.78)),
    "sofa": ((1.4, 1.8), (0.8, 0.95), (0.75, 0.9)),
    "bed": ((1.9, 2.1), (0.9, 1.3), (0.45, 0.6)),
    "lamp": ((0.3, 0.4), (0.3, 0.4), (1.3, 1.7)),
    "cabinet": ((0.6, 1.0), (0.4, 0.5), (0.8, 1.1)),
    "bookshelf": ((0.8, 1.0), (0.3, 0.4), (1.6, 1.9)),
    "plant": ((0.4, 0.6), (0.4, 0.6), (0.6, 1.1)),
}
_COLORS = {  # (main, accent) base colours, jittered per scene
    "wall": ((0.82, 0.78, 0.70), None), "floor": ((0.55, 0.38, 0.22), None), "ceiling": ((0.92, 0.92, 0.90), None),
    "chair": ((0.20, 0.35, 0.65), (0.15, 0.15, 0.18)), "table": ((0.62, 0.46, 0.30), (0.35, 0.25, 0.15)),
    "sofa": ((0.65, 0.15, 0.15), (0.50, 0.10, 0.10)), "bed": ((0.90, 0.90, 0.95), (0.35, 0.22, 0.12)),
    "lamp": ((0.95, 0.85, 0.45), (0.15, 0.15, 0.15)), "cabinet": ((0.25, 0.50, 0.35), None),
    "bookshelf": ((0.45, 0.30, 0.20), None), "plant": ((0.15, 0.55, 0.15), (0.70, 0.35, 0.20)),
}
# A part is (kind, local centre, size, colour key); local frame: footprint centred at 0, z from 0 (floor).
_Part = Tuple[str, Tuple[float, float, float], Tuple[float, ...], str]


def _parts_chair(w, d, h) -> List[_Part]:
    seat = 0.45
    leg_h = (seat - 0.06) / 2  # half height
    legs = [("box", (sx * (w / 2 - 0.04), sy * (d / 2 - 0.04), leg_h), (0.025, 0.025, leg_h), "accent")
            for sx in (-1, 1) for sy in (-1, 1)]
    return [("box", (0, 0, seat - 0.03), (w / 2, d / 2, 0.03), "main"),
            ("box", (0, d / 2 - 0.03, (seat + h) / 2), (w / 2, 0.03, (h - seat) / 2), "main")] + legs


def _parts_table(w, d, h) -> List[_Part]:
    leg_h = (h - 0.05) / 2  # half height
    legs = [("cylinder", (sx * (w / 2 - 0.06), sy * (d / 2 - 0.06), leg_h), (0.035, leg_h), "accent")
            for sx in (-1, 1) for sy in (-1, 1)]
    return [("box", (0, 0, h - 0.025), (w / 2, d / 2, 0.025), "main")] + legs


def _parts_sofa(w, d, h) -> List[_Part]:
    return [("box", (0, 0, 0.21), (w / 2, d / 2, 0.21), "main"),
            ("box", (0, d / 2 - 0.1, h / 2), (w / 2, 0.1, h / 2), "accent"),
            ("box", (-(w / 2 - 0.075), 0, 0.3), (0.075, d / 2, 0.3), "accent"),
            ("box", (w / 2 - 0.075, 0, 0.3), (0.075, d / 2, 0.3), "accent")]


def _parts_bed(w, d, h) -> List[_Part]:
    return [("box", (0, 0, 0.15), (w / 2, d / 2, 0.15), "accent"),
            ("box", (0.02, 0, (0.3 + h) / 2), (w / 2 - 0.06, d / 2 - 0.03, (h - 0.3) / 2), "main"),
            ("box", (-(w / 2 - 0.04), 0, (h + 0.45) / 2), (0.04, d / 2, (h + 0.45) / 2), "accent")]


def _parts_lamp(w, d, h) -> List[_Part]:
    shade_h = 0.35
    return [("cylinder", (0, 0, 0.02), (0.15, 0.02), "accent"),
            ("cylinder", (0, 0, (h - shade_h) / 2), (0.02, (h - shade_h) / 2), "accent"),
            ("cylinder", (0, 0, h - shade_h / 2), (min(w, d) / 2, shade_h / 2), "main")]


def _parts_box(w, d, h) -> List[_Part]:
    return [("box", (0, 0, h / 2), (w / 2, d / 2, h / 2), "main")]


def _parts_plant(w, d, h) -> List[_Part]:
    r = min(w, d) / 2
    pot_h = 0.3 * h
    return [("cylinder", (0, 0, pot_h / 2), (0.6 * r, pot_h / 2), "accent"),
            ("sphere", (0, 0, max(pot_h + 0.6 * r, h - r)), (r,), "main")]


_PART_BUILDERS: Dict[str, Callable[[float, float, float], List[_Part]]] = {
    "chair": _parts_chair, "table": _parts_table, "sofa": _parts_sofa, "bed": _parts_bed,
    "lamp": _parts_lamp, "cabinet": _parts_box, "bookshelf": _parts_box, "plant": _parts_plant,
}


def _jitter_color(rng: np.random.Generator, base) -> Tuple[float, float, float]:
    return tuple(float(c) for c in np.clip(np.asarray(base) + rng.uniform(-0.08, 0.08, 3), 0.03, 0.97))


def _random_surface(rng: np.random.Generator, instance_id: int, color) -> Surface:
    k = rng.normal(size=3)
    k = k / np.linalg.norm(k) * rng.uniform(8.0, 20.0)
    return Surface(instance_id, color, float(rng.uniform(0.12, 0.35)),
                   (float(k[0]), float(k[1]), float(k[2]), float(rng.uniform(0, 2 * np.pi))))
