"""Read a `shapes` image back into (colour, shape, size, position) per object, by pixel
analysis alone: segmentation from the background colour, connected components, colour by
the nearest palette entry, shape from fill ratio and the taper from base to apex, size from
the area, position from the centroid.
"""

from dataclasses import dataclass

import numpy as np
from PIL import Image

from .scenes import COLOURS, POSITIONS, SIZES, SQUARE_HALF_SIDE

FOREGROUND_DISTANCE = 60.0  # RGB distance from the background above which a pixel is an object
MIN_AREA = 0.004  # components smaller than this fraction of the image are noise
# Area of each shape for radius 1, to turn an area into a radius and a radius into a size.
UNIT_AREA = {"circle": np.pi, "square": (2 * SQUARE_HALF_SIDE) ** 2, "triangle": 3 * np.sqrt(3) / 4}
# Mean of bounding-box width and height of each shape for radius 1.
UNIT_EXTENT = {"circle": 2.0, "square": 2 * SQUARE_HALF_SIDE, "triangle": (np.sqrt(3) + 1.5) / 2}
SIZE_THRESHOLD = float(np.sqrt(SIZES["small"] * SIZES["large"]))


@dataclass(frozen=True)
class DetectedObject:
    colour: str
    shape: str
    size: str
    position: str
    area: float  # fraction of the image
    cx: float
    cy: float
    fill: float  # area over bounding-box area
    taper: float  # width of the top third over width of the bottom third

    def labels(self) -> dict:
        return {"colour": self.colour, "shape": self.shape, "size": self.size, "position": self.position}


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, as index arrays (largest first)."""
    h, w = mask.shape
    labels = np.zeros(mask.shape, dtype=np.int32)
    found = []
    flat = mask.ravel()
    lab = labels.ravel()
    for start in np.flatnonzero(flat):
        if lab[start]:
            continue
        label = len(found) + 1
        lab[start] = label
        stack, members = [start], []
        while stack:
            i = stack.pop()
            members.append(i)
            y, x = divmod(i, w)
            for j, ok in ((i - w, y > 0), (i + w, y < h - 1), (i - 1, x > 0), (i + 1, x < w - 1)):
                if ok and flat[j] and not lab[j]:
                    lab[j] = label
                    stack.append(j)
        found.append(np.array(members))
    return sorted(found, key=len, reverse=True)


def _classify_shape(fill: float, taper: float) -> str:
    if taper < 0.6 or fill < 0.62:
        return "triangle"
    return "square" if fill > 0.89 else "circle"


def analyse(image) -> list[DetectedObject]:
    """The objects in an image (PIL or uint8 (h, w, 3)), largest first."""
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected an RGB image (h, w, 3), got shape {pixels.shape}")
    h, w, _ = pixels.shape
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background = np.median(border, axis=0)
    mask = np.linalg.norm(pixels - background, axis=2) > FOREGROUND_DISTANCE
    palette_names = list(COLOURS)
    palette = np.array([COLOURS[c] for c in palette_names], dtype=np.float32)
    anchors = np.array([POSITIONS[p][0] for p in POSITIONS])
    objects = []
    for members in _components(mask):
        area = len(members) / (h * w)
        if area < MIN_AREA:
            break
        ys, xs = np.divmod(members, w)
        colour = np.median(pixels[ys, xs], axis=0)  # median: the anti-aliased rim does not pull it
        colour_name = palette_names[int(np.argmin(np.linalg.norm(palette - colour, axis=1)))]
        top, bottom, left, right = ys.min(), ys.max(), xs.min(), xs.max()
        fill = len(members) / ((bottom - top + 1) * (right - left + 1))
        third = max(1, (bottom - top + 1) // 3)
        top_width = np.bincount(ys - top, minlength=bottom - top + 1)[:third].mean()
        bottom_width = np.bincount(ys - top, minlength=bottom - top + 1)[-third:].mean()
        taper = float(top_width / max(bottom_width, 1e-6))
        shape = _classify_shape(fill, taper)
        # The radius from the area and from the bounding box, averaged: each alone is biased
        # by the anti-aliased rim on small objects, in opposite directions.
        extent = ((bottom - top + 1) / h + (right - left + 1) / w) / 2
        radius = (np.sqrt(area / UNIT_AREA[shape]) + extent / UNIT_EXTENT[shape]) / 2
        cx, cy = (xs.mean() + 0.5) / w, (ys.mean() + 0.5) / h
        position = list(POSITIONS)[int(np.argmin(np.linalg.norm(anchors - (cx, cy), axis=1)))]
        objects.append(
            DetectedObject(
                colour_name,
                shape,
                "large" if radius > SIZE_THRESHOLD else "small",
                position,
                float(area),
                float(cx),
                float(cy),
                float(fill),
                taper,
            )
        )
    return objects


def score(expected: dict, objects: list[DetectedObject]) -> dict:
    """Per attribute, whether the largest object found matches `expected` (False when none);
    `exact` when every attribute does."""
    found = objects[0].labels() if objects else {}
    result = {name: found.get(name) == value for name, value in expected.items()}
    result["exact"] = all(result.values())
    return result
