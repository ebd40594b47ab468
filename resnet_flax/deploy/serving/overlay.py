"""`/v1/explain`'s picture: the Grad-CAM map of one image over the pixels the model saw, as a PNG.

The map (`explain.methods`: non-negative, at the model's input size) is scaled to [0, 1] by its maximum,
coloured with matplotlib's `jet` as `--mode=explain`'s grid colours it, and blended half and half with the
image; the result is enlarged to at least `MIN_SIDE` pixels (bicubic), since a 32 px model's input is
too small to see.
"""

from __future__ import annotations

import io

import numpy as np
from matplotlib import colormaps
from PIL import Image

MIN_SIDE = 256
HEAT = 0.5  # The map's share of each blended pixel.


def grad_cam_png(pixels: np.ndarray, grad_cam: np.ndarray) -> bytes:
  """PNG bytes of uint8 `pixels` [H, W, 3] with the Grad-CAM map `grad_cam` [H, W] (>= 0) over them."""
  peak = float(grad_cam.max())
  heat = colormaps['jet'](grad_cam / peak if peak > 0 else grad_cam)[..., :3] * 255
  blended = Image.fromarray(np.round((1 - HEAT) * pixels + HEAT * heat).astype(np.uint8))
  scale = max(1, -(-MIN_SIDE // min(blended.size)))
  if scale > 1:
    blended = blended.resize((blended.width * scale, blended.height * scale), Image.Resampling.BICUBIC)
  output = io.BytesIO()
  blended.save(output, format='PNG')
  return output.getvalue()
