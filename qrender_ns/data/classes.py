"""Class lists of the benchmarks: ScanNet's NYU40 names and the 19/15/10-class subsets the peers evaluate on."""

from __future__ import annotations

from typing import Dict, List, Tuple


# NYU40 names as in OpenGaussian's scripts/eval_scannet.py (`nyu40_dict`).
NYU40_NAMES: Dict[int, str] = {
    0: "unlabeled", 1: "wall", 2: "floor", 3: "cabinet", 4: "bed", 5: "chair",
    6: "sofa", 7: "table", 8: "door", 9: "window", 10: "bookshelf",
    11: "picture", 12: "counter", 13: "blinds", 14: "desk", 15: "shelves",
    16: "curtain", 17: "dresser", 18: "pillow", 19: "mirror", 20: "floormat",
    21: "clothes", 22: "ceiling", 23: "books", 24: "refrigerator", 25: "television",
    26: "paper", 27: "towel", 28: "showercurtain", 29: "box", 30: "whiteboard",
    31: "person", 32: "nightstand", 33: "toilet", 34: "sink", 35: "lamp",
    36: "bathtub", 37: "bag", 38: "otherstructure", 39: "otherfurniture", 40: "otherprop",
}


# OpenGaussian's `target_id` lists (scripts/eval_scannet.py): 19 = the ScanNet-20 benchmark classes
# without otherfurniture (39); 15 drops picture, refrigerator, shower curtain, bathtub; 10 further
# drops cabinet, counter, desk, curtain, sink.
SUBSET_IDS: Dict[str, Tuple[int, ...]] = {
    "19": (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 16, 24, 28, 33, 34, 36),
    "15": (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 14, 16, 33, 34),
    "10": (1, 2, 4, 5, 6, 7, 8, 9, 10, 33),
}


def subset_classes(classes: str) -> Tuple[Tuple[int, ...], List[str]]:
    """(NYU40 ids, query names) of a ScanNet class subset."""
    if classes not in SUBSET_IDS:
        raise ValueError(f"unknown class subset {classes!r}: choose 19, 15 or 10 (or 'scene' for a generated scene)")
    ids = SUBSET_IDS[classes]
    return ids, [NYU40_NAMES[i] for i in ids]
