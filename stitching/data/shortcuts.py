"""Class-correlated shortcut markers added to stitching images (FuLA paper, Sec. 3.2).

Every marker is ``size × size`` pixels:

* ``kind="pixels"``: a square of one class-specific colour;
* ``kind="aruco"``: the 4×4 data bits of the class's ArUco marker (``DICT_4X4_50``);

placed by ``placement``:

* ``pattern``: the class's marker at a random location;
* ``location``: uniform random noise at a class-specific fixed location;
* ``both``: the class's marker at the class's location.

Random choices come from a generator seeded by (seed, image index), so a given image
always carries the same marker for a given seed.
"""

from __future__ import annotations

import colorsys
from pathlib import Path

import numpy as np
import torch

from stitching.errors import StitchingError

KINDS = ("pixels", "aruco")
PLACEMENTS = ("pattern", "location", "both")


def aruco_bits(marker_id: int) -> np.ndarray:
    """The 4×4 data bits (0/1) of ArUco marker ``marker_id`` in ``DICT_4X4_50``."""
    import cv2

    dictionary = cv2.aruco.getPredefinedDictionary(cv2.aruco.DICT_4X4_50)
    image = cv2.aruco.generateImageMarker(dictionary, int(marker_id), 6)  # 1-cell black border
    return (image[1:5, 1:5] > 127).astype(np.float32)


def class_colours(num_classes: int) -> torch.Tensor:
    """Evenly spaced, fully saturated hues: ``[K, 3]`` in [0, 1]."""
    return torch.tensor([colorsys.hsv_to_rgb(k / num_classes, 1.0, 1.0) for k in range(num_classes)],
                        dtype=torch.float32)


class Shortcut:
    """Adds the marker of an image's class to the image.

    Args:
        kind: ``pixels`` or ``aruco``.
        placement: ``pattern``, ``location`` or ``both``.
        num_classes: classes that get a marker.
        image_size: side of the (square) images.
        channels: image channels (markers are grey for 1 channel).
        size: marker side in pixels (a multiple of 4 for ArUco).
        seed: fixes class locations and every per-image random choice.
    """

    def __init__(self, kind: str, placement: str, num_classes: int, image_size: int, channels: int = 3,
                 size: int = 4, seed: int = 0):
        if kind not in KINDS:
            raise StitchingError(f"shortcut.kind='{kind}' is not one of {', '.join(KINDS)}")
        if placement not in PLACEMENTS:
            raise StitchingError(f"shortcut.placement='{placement}' is not one of {', '.join(PLACEMENTS)}")
        if kind == "aruco" and (size % 4 or num_classes > 50):
            raise StitchingError("ArUco shortcuts need shortcut.size a multiple of 4 and at most 50 classes")
        cells = (image_size // size) ** 2
        if placement != "pattern" and cells < num_classes:
            raise StitchingError(f"{image_size}px images hold only {cells} distinct {size}px locations "
                                 f"for {num_classes} classes; use a smaller shortcut.size")
        self.kind, self.placement, self.size, self.seed = kind, placement, size, seed
        self.num_classes, self.image_size, self.channels = num_classes, image_size, channels
        self.markers = self._markers()
        self.locations = self._locations()

    def _markers(self) -> torch.Tensor:
        """``[K, C, size, size]`` class markers in [0, 1]."""
        if self.kind == "pixels":
            colours = class_colours(self.num_classes)
            if self.channels != 3:
                colours = colours.mean(1, keepdim=True).expand(-1, self.channels)
            return colours[:, :, None, None].expand(-1, -1, self.size, self.size).clone()
        scale = self.size // 4
        bits = torch.stack([torch.from_numpy(aruco_bits(k)) for k in range(self.num_classes)])
        bits = bits.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
        return bits[:, None].expand(-1, self.channels, -1, -1).clone()

    def _locations(self) -> torch.Tensor:
        """``[K, 2]`` distinct top-left corners on a grid of marker-sized cells."""
        per_side = self.image_size // self.size
        generator = torch.Generator().manual_seed(self.seed)
        cells = torch.randperm(per_side * per_side, generator=generator)[: self.num_classes]
        return torch.stack([cells // per_side, cells % per_side], dim=1) * self.size

    def mark(self, label: int, index: int) -> tuple[torch.Tensor, tuple[int, int]]:
        """Image ``index``'s marker ``[C, size, size]`` and its top-left corner."""
        label = int(label)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + int(index))
        if self.placement == "location":
            patch = torch.rand((self.channels, self.size, self.size), generator=generator)
        else:
            patch = self.markers[label]
        if self.placement == "pattern":
            top, left = torch.randint(0, self.image_size - self.size + 1, (2,), generator=generator).tolist()
        else:
            top, left = self.locations[label].tolist()
        return patch, (top, left)

    def table(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every image's marker ``[N, C, size, size]`` and corner ``[N, 2]`` (image ``i`` has label
        ``labels[i]``), computed once so batches are marked without per-image work."""
        marks = [self.mark(label, index) for index, label in enumerate(labels.tolist())]
        return torch.stack([patch for patch, _ in marks]), torch.tensor([corner for _, corner in marks])

    def __call__(self, image: torch.Tensor, label: int, index: int) -> torch.Tensor:
        """Return a copy of ``image`` (``[C, H, W]`` in [0, 1]) carrying its class's shortcut."""
        patch, (top, left) = self.mark(label, index)
        marked = image.clone()
        marked[:, top : top + self.size, left : left + self.size] = patch
        return marked


def save_examples(shortcut: Shortcut, images: torch.Tensor, labels: torch.Tensor, path: Path,
                  per_class: int = 2) -> Path:
    """A grid (columns: classes) of marked training images, so a user sees what the model saw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    classes = sorted(set(labels.tolist()))
    fig, axes = plt.subplots(per_class, len(classes), figsize=(1.1 * len(classes), 1.2 * per_class + 0.3),
                             squeeze=False)
    for col, cls in enumerate(classes):
        members = torch.nonzero(labels == cls).flatten()[:per_class]
        for row in range(per_class):
            ax = axes[row][col]
            ax.axis("off")
            if row < len(members):
                index = int(members[row])
                image = shortcut(images[index].float() / 255, cls, index)
                ax.imshow(image.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray", vmin=0, vmax=1,
                          interpolation="nearest")
            if row == 0:
                ax.set_title(f"class {cls}", fontsize=7)
    fig.suptitle(f"{shortcut.kind} / {shortcut.placement}", fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path
