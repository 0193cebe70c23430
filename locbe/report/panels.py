"""PNG panels of the report: one image per file, read without knowing locbe.

A panel is one row of six tiles (image | CAM | region partition | pseudo label | prediction | ground truth),
titled with the image id and its image-level classes. Under the CAM tile a colour bar, under the region tile
the key of the three regions (method.md "Region partition"), under the three label tiles a legend naming every
class colour those tiles show. The layout is in pixels, so a panel's size follows from its image's aspect ratio
and the legend's length alone (``panel_size``); rendering is matplotlib's Agg with its bundled font, without
pyplot or any global state, and the PNG carries no version stamp: the same inputs give the same bytes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from locbe.data.classes import IGNORE_INDEX
from locbe.runtime.fileio import atomic_path

REGION_NAMES = ("background", "uncertain", "confident")  # regions 0 / 1 / 2, as method.md names them
REGION_COLORS = np.array([[40, 40, 40], [230, 200, 40], [220, 40, 40]], dtype=np.uint8)
COLUMN_TITLES = ("image", "CAM (image classes, max)", "regions (aux CAM)", "pseudo label (CAM + PAR)",
                 "prediction (seg head)", "ground truth")
CAM_COLORMAP = "jet"

# layout, in pixels at DPI (fonts are in points: 1 pt = DPI / 72 px)
DPI = 100
TILE_WIDTH = 200
TILE_HEIGHT_RANGE = (100, 300)  # a very wide or tall image is letterboxed inside its tile
MARGIN = 15
GAP = 15
TOP_BAND = 62  # figure title and column titles
BOTTOM_BAND = 100  # colour bar, region key (title + 3 rows) and up to LEGEND_COLUMNS * 3 legend entries
LEGEND_COLUMNS = 4
LEGEND_ROW = 20  # one more legend row beyond the third adds this much height
TITLE_CHARS = 110  # characters of the title that fit one line at 13 pt bold


@dataclass(frozen=True)
class Panel:
    """What one panel shows. Label maps hold class indices (255 = ignore); ``cam`` is in [0, 1]."""

    image_id: str
    image: np.ndarray  # (H, W, 3) uint8
    cam: np.ndarray  # (H, W) float: max over the image's classes
    regions: np.ndarray  # (H, W) 0 background / 1 uncertain / 2 confident
    pseudo: np.ndarray  # (H, W) pseudo label
    pred: np.ndarray  # (H, W) segmentation prediction
    gt: np.ndarray  # (H, W) ground truth
    image_classes: Sequence[int]  # class indices (1-based: 0 is background) of the image-level label
    class_names: Sequence[str]  # index -> name, background first


def image_classes_from_label(cls_label) -> list[int]:
    """Class indices (background = 0) of a foreground one-hot image label (F entries for classes 1..F)."""
    return [int(c) + 1 for c in np.flatnonzero(np.asarray(cls_label))]


def class_name(index: int, class_names: Sequence[str]) -> str:
    if index == IGNORE_INDEX:
        return "ignore"
    return class_names[index] if 0 <= index < len(class_names) else f"class {index}"


def classes_shown(*label_maps: np.ndarray) -> list[int]:
    """Every label value present in the label tiles, sorted (255 = ignore last): the legend's entries."""
    present: set[int] = set()
    for label in label_maps:
        present.update(int(v) for v in np.unique(label))
    return sorted(present)


def panel_title(panel: Panel) -> str:
    """Image id and image-level class names; past TITLE_CHARS (one line at the saved width) the rest is counted."""
    names = [class_name(c, panel.class_names) for c in panel.image_classes]
    head = f"{panel.image_id}  -  image classes: "
    if not names:
        return head + "none"
    shown = []
    for i, name in enumerate(names):
        rest = len(names) - i - 1
        tail = f" (+{rest} more)" if rest else ""
        if shown and len(head + ", ".join([*shown, name]) + tail) > TITLE_CHARS:
            return head + ", ".join(shown) + f" (+{len(names) - len(shown)} more)"
        shown.append(name)
    return head + ", ".join(shown)


def panel_size(image_hw: tuple[int, int], legend_entries: int) -> tuple[int, int]:
    """(width, height) in pixels of the PNG of a panel."""
    return _layout(image_hw, legend_entries)["size"]


def _tile_height(image_hw: tuple[int, int]) -> int:
    h, w = image_hw
    low, high = TILE_HEIGHT_RANGE
    return int(min(max(round(TILE_WIDTH * h / w), low), high))


def _layout(image_hw: tuple[int, int], legend_entries: int) -> dict:
    tile_h = _tile_height(image_hw)
    rows = math.ceil(legend_entries / LEGEND_COLUMNS)
    bottom = BOTTOM_BAND + LEGEND_ROW * max(0, rows - 3)
    n = len(COLUMN_TITLES)
    width = 2 * MARGIN + n * TILE_WIDTH + (n - 1) * GAP
    height = TOP_BAND + tile_h + bottom
    tiles = [(MARGIN + i * (TILE_WIDTH + GAP), bottom, TILE_WIDTH, tile_h) for i in range(n)]  # x, y from below
    return {"size": (width, height), "tiles": tiles, "bottom": bottom}


def _colorize(label: np.ndarray, palette: Sequence[int]) -> np.ndarray:
    pal = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    return pal[label.astype(np.int64).clip(0, 255)]


def build_figure(panel: Panel, palette: Sequence[int]):
    """The matplotlib Figure of a panel (not saved): tiles, titles, colour bar, region key, class legend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    shown = classes_shown(panel.pseudo, panel.pred, panel.gt)
    lay = _layout(panel.image.shape[:2], len(shown))
    width, height = lay["size"]
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    FigureCanvasAgg(fig)  # Agg whatever backend the user's matplotlib is set to

    def box(x, y, w, h):  # pixels from the lower left -> figure fraction
        return [x / width, y / height, w / width, h / height]

    fig.text(MARGIN / width, 1 - 8 / height, panel_title(panel), ha="left", va="top", fontsize=13,
             fontweight="bold")
    tiles = [panel.image, panel.cam, REGION_COLORS[np.asarray(panel.regions, dtype=np.int64)],
             _colorize(panel.pseudo, palette), _colorize(panel.pred, palette), _colorize(panel.gt, palette)]
    cam_image = None
    for i, (title, data, rect) in enumerate(zip(COLUMN_TITLES, tiles, lay["tiles"])):
        ax = fig.add_axes(box(*rect))
        if i == 1:
            cam_image = ax.imshow(np.asarray(data, dtype=np.float32), cmap=CAM_COLORMAP, vmin=0.0, vmax=1.0,
                                  interpolation="antialiased")
        else:  # label maps: nearest, so every pixel keeps a palette colour the legend names
            ax.imshow(data, interpolation="antialiased" if i == 0 else "nearest")
        ax.set_title(title, fontsize=10.5, pad=4)
        ax.set_axis_off()

    top = lay["bottom"] - 8  # the bands under the tiles start here (pixels from below)
    cam_x = lay["tiles"][1][0]
    cax = fig.add_axes(box(cam_x + 10, top - 12, TILE_WIDTH - 20, 12))
    bar = fig.colorbar(cam_image, cax=cax, orientation="horizontal", ticks=[0, 0.25, 0.5, 0.75, 1])
    bar.ax.tick_params(labelsize=8.5)
    bar.set_label("CAM score (0 = none, 1 = strongest)", fontsize=8.5, labelpad=2)

    region_handles = [Patch(facecolor=REGION_COLORS[i] / 255, edgecolor="black", linewidth=0.5,
                            label=f"{i} {name}") for i, name in enumerate(REGION_NAMES)]
    fig.legend(handles=region_handles, loc="upper left", bbox_to_anchor=box(lay["tiles"][2][0], top, 0, 0)[:2],
               ncol=1, fontsize=9, title="region", title_fontsize=9, frameon=False, borderaxespad=0,
               handlelength=1.2, handleheight=1.0, labelspacing=0.25, alignment="left")

    pal = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    class_handles = [Patch(facecolor=pal[min(c, 255)] / 255, edgecolor="black", linewidth=0.5,
                           label=f"{c} {class_name(c, panel.class_names)}") for c in shown]
    fig.legend(handles=class_handles, loc="upper left", bbox_to_anchor=box(lay["tiles"][3][0], top, 0, 0)[:2],
               ncol=LEGEND_COLUMNS, fontsize=9, title="class colours in pseudo label / prediction / ground truth",
               title_fontsize=9, frameon=False, borderaxespad=0, handlelength=1.2, handleheight=1.0,
               labelspacing=0.25, columnspacing=1.0, alignment="left")
    return fig


def write_panel(path: Path, panel: Panel, palette: Sequence[int]) -> None:
    """Save ``panel`` as a PNG at ``path`` (atomic), ``panel_size`` pixels."""
    fig = build_figure(panel, palette)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=DPI, format="png", metadata={"Software": None})
