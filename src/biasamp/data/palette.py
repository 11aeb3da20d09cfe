"""The Biased MNIST colour palette: one background colour per digit class (ReBias's choice).

``PALETTE[d]`` is the RGB colour (uint8, 0..255) that marks digit ``d`` as bias-aligned;
``COLOUR_NAMES[d]`` is its name. The colour oracle and the dataset both index this table.
"""

from __future__ import annotations

import numpy as np

PALETTE: np.ndarray = np.array(
    [
        [255, 0, 0],  # 0 red
        [0, 255, 0],  # 1 green
        [0, 0, 255],  # 2 blue
        [225, 225, 0],  # 3 yellow
        [225, 0, 225],  # 4 magenta
        [0, 255, 255],  # 5 cyan
        [255, 128, 0],  # 6 orange
        [255, 0, 128],  # 7 rose
        [128, 0, 255],  # 8 electric violet
        [128, 128, 128],  # 9 grey
    ],
    dtype=np.uint8,
)
PALETTE.setflags(write=False)

COLOUR_NAMES: tuple[str, ...] = (
    "red",
    "green",
    "blue",
    "yellow",
    "magenta",
    "cyan",
    "orange",
    "rose",
    "violet",
    "grey",
)
