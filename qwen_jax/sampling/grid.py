"""Sample grids: many images as one picture."""

from __future__ import annotations

import numpy as np


def image_grid(images: np.ndarray, cols: int | None = None, pad: int = 2) -> np.ndarray:
    """(N, H, W, 3) images in [0, 1] -> one (rows*H + gaps, cols*W + gaps, 3) image, white gaps."""
    images = np.asarray(images)
    n, h, w, c = images.shape
    cols = cols or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    grid = np.ones((rows * h + (rows - 1) * pad, cols * w + (cols - 1) * pad, c), images.dtype)
    for i, img in enumerate(images):
        r, col = divmod(i, cols)
        grid[r * (h + pad): r * (h + pad) + h, col * (w + pad): col * (w + pad) + w] = img
    return grid
