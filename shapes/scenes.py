"""The `shapes` grammar: one coloured shape on a plain background, and a caption that says
exactly what is drawn. Text-image agreement on it is measurable by pixel analysis alone.

A scene is (size, colour, shape, position); its caption reads
"a small red circle on the left". Three (colour, shape) pairs never appear in training
(`HELDOUT_PAIRS`); the `heldout` split draws only those, to measure composition.
"""

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 30),
    "purple": (140, 60, 180),
    "orange": (245, 135, 20),
}
SIZES = {"small": 0.12, "large": 0.2}  # radius of the circumscribed circle, as a fraction of the side
POSITIONS = {
    "left": ((0.27, 0.5), "on the left"),
    "right": ((0.73, 0.5), "on the right"),
    "top": ((0.5, 0.27), "at the top"),
    "bottom": ((0.5, 0.73), "at the bottom"),
    "middle": ((0.5, 0.5), "in the middle"),
}
BACKGROUND = (250, 250, 250)
HELDOUT_PAIRS = (("purple", "square"), ("orange", "circle"), ("green", "triangle"))
ATTRIBUTES = ("colour", "shape", "size", "position")
SPLITS = ("train", "heldout")
SQUARE_HALF_SIDE = 0.85  # a square's half side, in units of its radius
SUPERSAMPLE = 4


@dataclass(frozen=True)
class Scene:
    size: str
    colour: str
    shape: str
    position: str
    cx: float  # centre, as a fraction of the side
    cy: float
    radius: float  # as a fraction of the side

    @property
    def caption(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} {POSITIONS[self.position][1]}"

    def labels(self) -> dict:
        return {name: getattr(self, name) for name in ATTRIBUTES}

    def to_dict(self) -> dict:
        return asdict(self)


def _pairs(split: str) -> list[tuple[str, str]]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    every = [(c, s) for c in COLOURS for s in SHAPES]
    return [p for p in every if (p in HELDOUT_PAIRS) == (split == "heldout")]


def random_scene(rng: np.random.Generator, split: str = "train") -> Scene:
    """One scene, drawn uniformly over the split's (colour, shape) pairs, sizes and positions,
    with a small jitter of centre (+-0.04) and radius (+-8%)."""
    pairs = _pairs(split)
    colour, shape = pairs[int(rng.integers(len(pairs)))]
    size = list(SIZES)[int(rng.integers(len(SIZES)))]
    position = list(POSITIONS)[int(rng.integers(len(POSITIONS)))]
    (cx, cy), _ = POSITIONS[position]
    jitter = rng.uniform(-0.04, 0.04, size=2)
    radius = SIZES[size] * float(rng.uniform(0.92, 1.08))
    return Scene(size, colour, shape, position, float(cx + jitter[0]), float(cy + jitter[1]), radius)


def scene_from_caption(caption: str) -> Scene:
    """The scene a caption of this grammar describes, at the nominal centre and radius."""
    words = caption.strip().lower().split()
    if len(words) < 5 or words[0] != "a":
        raise ValueError(f"not a shapes caption: {caption!r} (expected e.g. 'a small red circle on the left')")
    size, colour, shape = words[1:4]
    phrase = " ".join(words[4:])
    positions = {p: name for name, (_, p) in POSITIONS.items()}
    if size not in SIZES or colour not in COLOURS or shape not in SHAPES or phrase not in positions:
        raise ValueError(
            f"not a shapes caption: {caption!r}; sizes {list(SIZES)}, colours {list(COLOURS)}, "
            f"shapes {list(SHAPES)}, positions {list(positions)}"
        )
    position = positions[phrase]
    (cx, cy), _ = POSITIONS[position]
    return Scene(size, colour, shape, position, cx, cy, SIZES[size])


def render(scene: Scene, image_size: int) -> Image.Image:
    """The scene drawn at `SUPERSAMPLE` times the size and box-filtered down (anti-aliased edges)."""
    big = image_size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(image)
    cx, cy, r = scene.cx * big, scene.cy * big, scene.radius * big
    fill = COLOURS[scene.colour]
    if scene.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif scene.shape == "square":
        h = r * SQUARE_HALF_SIDE
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    else:  # an equilateral triangle pointing up, inscribed in the circle of radius r
        draw.polygon([(cx, cy - r), (cx - r * 0.8660254, cy + r / 2), (cx + r * 0.8660254, cy + r / 2)], fill=fill)
    return image.resize((image_size, image_size), Image.BOX)


class ShapesDataset:
    """`length` scenes of a split, item i drawn from a generator seeded with (seed, split, i):
    `dataset[i] -> (PIL image, caption, Scene)`; any index is reproducible on its own."""

    def __init__(self, seed: int = 0, image_size: int = 64, split: str = "train", length: int = 100_000):
        _pairs(split)
        if image_size < 8:
            raise ValueError(f"image_size must be at least 8, got {image_size}")
        self.seed, self.image_size, self.split, self.length = seed, image_size, split, length

    def __len__(self) -> int:
        return self.length

    def scene(self, index: int) -> Scene:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} scenes")
        rng = np.random.default_rng([self.seed, SPLITS.index(self.split), index])
        return random_scene(rng, self.split)

    def __getitem__(self, index: int):
        scene = self.scene(index)
        return render(scene, self.image_size), scene.caption, scene


def captions(split: str, n: int, seed: int = 1234) -> list[Scene]:
    """n scenes of a split for evaluation, from a seed apart from training's."""
    data = ShapesDataset(seed=seed, split=split, length=n)
    return [data.scene(i) for i in range(n)]
