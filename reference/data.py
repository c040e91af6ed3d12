"""Training data: the built-in `shapes` set and image folders with a caption manifest.

A data set here is indexable: `dataset[i] -> (image (3, s, s) float in [0, 1], caption)`,
and batches are drawn by index from a generator seeded with (seed, step), so a resumed
run sees exactly the batches an uninterrupted one would.
"""

import csv
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError


class DataError(ValueError):
    """A data set that cannot be used; the message names the file and what to fix."""


def image_to_tensor(image: Image.Image, size: int) -> torch.Tensor:
    """RGB, centre-cropped to a square, resized with a box filter to size x size, in [0, 1]."""
    image = image.convert("RGB")
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    image = image.crop((left, top, left + side, top + side))
    if side != size:
        image = image.resize((size, size), Image.BOX)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


class ShapesData:
    """The procedural `shapes` set (imagen.shapes) rendered at `image_size`."""

    def __init__(self, image_size: int, seed: int = 0, length: int = 100_000):
        from imagen.shapes import ShapesDataset

        self.shapes = ShapesDataset(seed=seed, image_size=image_size, split="train", length=length)
        self.image_size = image_size

    def __len__(self):
        return len(self.shapes)

    def __getitem__(self, index: int):
        image, caption, _ = self.shapes[index]
        return image_to_tensor(image, self.image_size), caption


class FolderData:
    """Images in a folder with a manifest (`manifest.jsonl`, `captions.jsonl` or `*.csv`) of
    rows with `file` and `caption`. Bad rows (missing file, unreadable image, empty caption)
    are skipped and counted in `skipped`, never fatal."""

    def __init__(self, root: str | Path, image_size: int):
        self.root = Path(root)
        self.image_size = image_size
        self.skipped: dict[str, int] = {}
        rows = self._read_manifest()
        self.items: list[tuple[Path, str]] = []
        for row in rows:
            file, caption = row.get("file"), row.get("caption")
            if not isinstance(caption, str) or not caption.strip():
                self._skip("empty caption")
                continue
            path = (self.root / str(file)).resolve() if file else None
            if path is None or not path.is_file() or self.root.resolve() not in path.parents:
                self._skip("missing file")
                continue
            self.items.append((path, caption.strip()))
        if not self.items:
            raise DataError(
                f"{self.root} has no usable rows (skipped: {self.skipped}); each row needs an "
                "existing image `file` (relative to the folder) and a non-empty `caption`"
            )

    def _skip(self, reason: str):
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def _read_manifest(self) -> list[dict]:
        if not self.root.is_dir():
            raise DataError(
                f"{self.root} is not a folder; --dataset takes 'shapes' or a folder of images "
                "with a manifest.jsonl or a .csv of file,caption rows"
            )
        jsonl = [p for p in (self.root / "manifest.jsonl", self.root / "captions.jsonl") if p.is_file()]
        if jsonl:
            rows = []
            for line in jsonl[0].read_text(encoding="utf-8", errors="replace").splitlines():
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    self._skip("bad manifest line")
                    continue
                rows.append(row if isinstance(row, dict) else {})
            return rows
        csvs = sorted(self.root.glob("*.csv"))
        if csvs:
            with open(csvs[0], newline="", encoding="utf-8", errors="replace") as f:
                return list(csv.DictReader(f))
        raise DataError(f"{self.root} has no manifest.jsonl or .csv; write one row per image with `file` and `caption`")

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index: int):
        path, caption = self.items[index]
        try:
            with Image.open(path) as image:
                return image_to_tensor(image, self.image_size), caption
        except (OSError, UnidentifiedImageError, ValueError):
            self._skip("unreadable image")
            return None


def make_dataset(name: str, image_size: int, seed: int = 0):
    if name == "shapes":
        return ShapesData(image_size, seed=seed)
    return FolderData(name, image_size)


def draw_batch(dataset, batch_size: int, seed: int, step: int, split_offset: int = 0):
    """A batch for `step`, chosen from (seed, step) alone; unreadable items are replaced by others."""
    rng = np.random.default_rng([seed, step, split_offset])
    images, captions = [], []
    attempts = 0
    while len(images) < batch_size:
        attempts += 1
        if attempts > 20 * batch_size:
            raise DataError(f"could not read {batch_size} images in {attempts} tries; check the data set")
        item = dataset[int(rng.integers(len(dataset)))]
        if item is None:
            continue
        images.append(item[0])
        captions.append(item[1])
    return torch.stack(images), captions
