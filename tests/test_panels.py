"""Report panels (issue 17): size, legend, colour bar, region key and title of the PNG a person reads."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from locbe.data import COCO_CLASSES, VOC_CLASSES, voc_palette
from locbe.report.panels import (
    TILE_WIDTH,
    TITLE_CHARS,
    Panel,
    build_figure,
    classes_shown,
    image_classes_from_label,
    panel_size,
    panel_title,
    write_panel,
)


def make_panel(h=40, w=60, image_classes=(3, 7), image_id="2007_000032") -> Panel:
    """Label tiles holding exactly: pseudo {0, 3, 255}, prediction {0, 3, 7}, ground truth {0, 3, 12}."""
    rng = np.random.default_rng(0)
    pseudo = np.zeros((h, w), np.int64)
    pseudo[:, : w // 3] = 3
    pseudo[:, w // 3 : w // 2] = 255
    pred = np.zeros((h, w), np.int64)
    pred[: h // 2, : w // 2] = 3
    pred[h // 2 :, w // 2 :] = 7
    gt = np.zeros((h, w), np.int64)
    gt[:, : w // 2] = 3
    gt[0, 0] = 12  # a single pixel still gets its legend entry
    return Panel(image_id, rng.integers(0, 256, (h, w, 3), dtype=np.uint8), rng.random((h, w)),
                 rng.integers(0, 3, (h, w)), pseudo, pred, gt, list(image_classes), VOC_CLASSES)


def legend_texts(legend) -> list[str]:
    return [t.get_text() for t in legend.get_texts()]


def test_png_per_panel_at_the_expected_size(tmp_path):
    # width: 2 margins of 15 + 6 tiles of 200 + 5 gaps of 15 = 1305 px, whatever the image
    # height: 62 (titles) + tile (200 * h / w, within 100..300) + 100 (bars and keys, up to 3 legend rows of 4)
    cases = [(make_panel(40, 60), (1305, 62 + 133 + 100)),  # 200 * 40 / 60 = 133.3
             (make_panel(300, 100), (1305, 62 + 300 + 100)),  # a tall image: 600 capped at 300
             (make_panel(10, 100), (1305, 62 + 100 + 100))]  # a wide one: 20 raised to 100
    for i, (panel, size) in enumerate(cases):
        write_panel(tmp_path / "panels" / f"{i}.png", panel, voc_palette())
        with Image.open(tmp_path / "panels" / f"{i}.png") as im:
            assert im.size == size == panel_size(panel.image.shape[:2], 5)
    assert sorted(p.name for p in (tmp_path / "panels").iterdir()) == ["0.png", "1.png", "2.png"]  # no temp files
    # 17 legend entries: 5 rows of 4, two more than the band holds -> 2 x 20 px taller
    assert panel_size((40, 60), 17) == (1305, 62 + 133 + 100 + 40)


def test_legend_names_exactly_the_classes_in_the_label_tiles():
    panel = make_panel()
    assert classes_shown(panel.pseudo, panel.pred, panel.gt) == [0, 3, 7, 12, 255]
    fig = build_figure(panel, voc_palette())
    regions, classes = fig.legends
    assert legend_texts(classes) == ["0 background", "3 bird", "7 car", "12 dog", "255 ignore"]
    assert legend_texts(regions) == ["0 background", "1 uncertain", "2 confident"]  # method.md's names
    # each legend patch has its tile's colour: VOC palette (hand-written) and the region colours
    colours = [tuple(round(255 * v) for v in p.get_facecolor()[:3]) for p in classes.get_patches()]
    assert colours == [(0, 0, 0), (128, 128, 0), (128, 128, 128), (64, 0, 128), (224, 224, 192)]
    gt_tile = fig.axes[5].get_images()[0].get_array()
    assert tuple(gt_tile[0, 0]) == (64, 0, 128) and tuple(gt_tile[-1, 0]) == (128, 128, 0)
    region_tile = np.asarray(fig.axes[2].get_images()[0].get_array())
    for i, patch in enumerate(regions.get_patches()):
        rgb = tuple(round(255 * v) for v in patch.get_facecolor()[:3])
        assert (region_tile[panel.regions == i] == rgb).all()
    # another image, another legend: only background and person
    person = np.full((40, 60), 15)
    only_person = replace(panel, pseudo=person, pred=person, gt=np.where(np.arange(60) < 30, 0, person))
    assert legend_texts(build_figure(only_person, voc_palette()).legends[1]) == ["0 background", "15 person"]


def test_cam_tile_has_a_colour_bar_over_zero_to_one():
    panel = make_panel()
    fig = build_figure(panel, voc_palette())
    cam_image = fig.axes[1].get_images()[0]
    np.testing.assert_array_equal(cam_image.get_array(), panel.cam.astype(np.float32))  # the data is the CAM
    assert cam_image.get_clim() == (0.0, 1.0)
    bars = [ax for ax in fig.axes[6:] if "CAM" in ax.get_xlabel()]
    assert len(bars) == 1 and bars[0].get_xlim() == (0.0, 1.0)
    # under the CAM tile, not elsewhere
    cam_box, bar_box = fig.axes[1].get_position(), bars[0].get_position()
    assert cam_box.x0 <= bar_box.x0 < bar_box.x1 <= cam_box.x1 and bar_box.y1 < cam_box.y0


def test_title_names_the_image_and_its_classes():
    one_hot = np.zeros(20)
    one_hot[[0, 14]] = 1  # aeroplane and person
    assert image_classes_from_label(one_hot) == [1, 15]
    panel = make_panel(image_classes=image_classes_from_label(one_hot))
    fig = build_figure(panel, voc_palette())
    assert fig.texts[0].get_text() == "2007_000032  -  image classes: aeroplane, person"
    assert panel_title(make_panel(image_classes=())).endswith("image classes: none")
    # many COCO classes: one line, the first names in order, the rest counted
    many = replace(panel, image_id="000000000139", image_classes=list(range(1, 31)), class_names=COCO_CLASSES)
    title = panel_title(many)
    assert len(title) <= TITLE_CHARS and title.startswith("000000000139  -  image classes: person, bicycle, car")
    shown = title.split(": ", 1)[1].split(" (+")[0].split(", ")
    assert shown == list(COCO_CLASSES[1 : 1 + len(shown)]) and title.endswith(f"(+{30 - len(shown)} more)")


@pytest.mark.parametrize("classes", [VOC_CLASSES, COCO_CLASSES])
def test_titles_are_legible_and_fit_at_the_saved_size(classes):
    longest = sorted(range(1, len(classes)), key=lambda c: -len(classes[c]))[:15]  # diningtable, baseball glove..
    stripes = np.array(longest)[np.arange(60) * 15 // 60][None].repeat(40, 0)
    stripes[0, 0] = 0  # with 0, 3, 7, 255 of the other tiles: 18-19 legend entries, 5 rows (the band holds 3)
    panel = replace(make_panel(), image_classes=sorted(longest) * 3, class_names=classes, gt=stripes)
    fig = build_figure(panel, voc_palette())
    assert len(fig.legends[1].get_texts()) >= 17  # 5 rows
    renderer = fig.canvas.get_renderer()
    width = fig.get_size_inches()[0] * fig.dpi
    for ax in fig.axes[:6]:
        assert ax.title.get_fontsize() >= 10
        assert ax.title.get_window_extent(renderer).width <= TILE_WIDTH  # no column title runs into the next
    assert fig.texts[0].get_fontsize() >= 12 and fig.texts[0].get_window_extent(renderer).x1 <= width
    for legend in fig.legends:
        box = legend.get_window_extent(renderer)
        assert box.x1 <= width and box.y0 >= 0  # the keys stay inside the picture


def test_same_inputs_same_bytes(tmp_path):
    for name in ("a.png", "b.png"):
        write_panel(tmp_path / name, make_panel(), voc_palette())
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
