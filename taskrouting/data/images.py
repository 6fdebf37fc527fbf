"""Images decoded from files on access (Pillow, imported only when a file is read)."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..extras import require

__all__ = ["ImageFiles", "require_pil"]


def require_pil():
    """The ``PIL.Image`` module, or an ImportError saying how to get it."""
    return require("PIL.Image", "images", "decoding image files")


def _size(size) -> tuple[int, int]:
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    if height < 1 or width < 1:
        raise ValueError(f"image_size must be positive, got {size!r}")
    return int(height), int(width)


class ImageFiles:
    """A list of image files read as uint8 ``[C, H, W]`` tensors of one size.

    Each file is converted to RGB (or grayscale when ``channels=1``), optionally center-cropped
    to a square (``square_crop``), then resized (bilinear) to ``image_size`` (int or (H, W)).
    """

    def __init__(self, paths: Sequence[Path], image_size=64, channels: int = 3, square_crop: bool = False):
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.paths = [Path(p) for p in paths]
        self.image_size, self.channels, self.square_crop = _size(image_size), channels, square_crop

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, *self.image_size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        image_module = require_pil()
        path = self.paths[index]
        try:
            with image_module.open(path) as image:
                image = image.convert("L" if self.channels == 1 else "RGB")
                if self.square_crop:
                    side = min(image.size)
                    left, top = (image.size[0] - side) // 2, (image.size[1] - side) // 2
                    image = image.crop((left, top, left + side, top + side))
                height, width = self.image_size
                image = image.resize((width, height), image_module.Resampling.BILINEAR)
                array = np.asarray(image, dtype=np.uint8)
        except FileNotFoundError:
            raise FileNotFoundError(f"image file {str(path)!r} is missing") from None
        except OSError as exc:
            raise OSError(f"cannot decode image file {str(path)!r}: {exc}") from exc
        tensor = torch.from_numpy(array.copy())
        return tensor.unsqueeze(0) if tensor.dim() == 2 else tensor.permute(2, 0, 1).contiguous()

    def subset(self, indices) -> ImageFiles:
        return ImageFiles([self.paths[int(i)] for i in indices], self.image_size, self.channels, self.square_crop)

    def check(self, dataset: str, folder: Path) -> ImageFiles:
        """Fail early, naming the folder, when it or the first/last listed image is missing
        (every file is checked again when read)."""
        if not folder.is_dir():
            raise FileNotFoundError(f"{dataset}: expected the image folder {str(folder)!r}, but it does not exist")
        for path in {self.paths[0], self.paths[-1]} if self.paths else ():
            if not path.is_file():
                raise FileNotFoundError(f"{dataset}: expected the image {str(path)!r} (listed in the "
                                        f"annotations), but there is no such file")
        return self
