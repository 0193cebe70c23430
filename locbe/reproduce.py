"""`locbe reproduce --preset {smoke,voc,coco}`: data -> train -> eval -> report, resumable.

Each stage leaves an artefact and is skipped when it is already there: the synthetic dataset
(smoke), ``checkpoints/final.pth`` (training resumes from ``last.pth`` after an interruption), the
metrics JSON of each evaluation (tagged with the checkpoint's step), and finally the tables in
``<out>/report/`` (or ``--reports DIR``/<preset>/). Re-running a finished reproduction rewrites the
same tables. A run directory made with another config is not reused (``--force-new`` moves it aside).
Exit codes (README): 0 when every stage ran and the preset's acceptance line held, 3 when it did not.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from locbe.config import PRESETS, TrainConfig, apply_overrides, get_preset
from locbe.device import DEVICE_CHOICES
from locbe.errors import AcceptanceError, ConfigError, MissingPathError

NOT_COMPARABLE = "not comparable to the paper: synthetic data, micro ViT from scratch"
# seg mIoU (single scale) / best trivial baseline must reach this for the run to pass (exit code 3 otherwise)
ACCEPTANCE = {"smoke": 2.0}
ABLATIONS = {"baseline (ToCo)": dict(use_loc=False, use_be=False), "+LOC": dict(use_be=False),
             "+BE": dict(use_loc=False), "full (LOC-BE)": {},
             "authors' defects fixed (full, fidelity=fixed)": dict(fidelity="fixed")}


def _stage_train(cfg: TrainConfig, progress: bool, force_new: bool = False) -> Path:
    from locbe.train import train
    from locbe.training.rundir import check_same_config, checkpoint_paths

    last, final = checkpoint_paths(cfg.out_dir)
    if final.exists() and not force_new:
        check_same_config(cfg.out_dir, cfg, f"reuse {final}")
        print(f"[train] {final} exists: skipped")
        return final
    resume = last.exists() and not force_new
    print(f"[train] {'resuming' if resume else 'starting'} {cfg.preset} in {cfg.out_dir}")
    return train(cfg, resume=resume, force_new=force_new, progress=progress).checkpoint


def _stage_eval(checkpoint: Path, cfg: TrainConfig, split: str, key: str, progress: bool, **opts) -> dict:
    """One evaluation on ``cfg.device`` under the dataset's protocol (sharded when torchrun launched us),
    resumable: the per-image records live in ``eval/<key>.parts/`` until the metrics file is written."""
    import shutil

    import torch

    from locbe.data import build_dataset
    from locbe.device import resolve_device
    from locbe.eval.evaluate import EvalOptions, evaluate, load_model_for_eval
    from locbe.eval.sharded import barrier
    from locbe.fileio import atomic_write_json
    from locbe.ranks import current_ranks

    out = checkpoint.parent.parent / "eval" / f"{key}.json"
    # tensors mapped to the meta device: only the step is read, not the weights and optimiser state
    step = int(torch.load(checkpoint, map_location="meta", weights_only=True, mmap=True)["step"])
    if out.exists():
        cached = json.loads(out.read_text())
        if cached.get("checkpoint_step") == step:
            print(f"[eval] {out} exists: skipped")
            return cached
    device = resolve_device(cfg.device)
    model, _ = load_model_for_eval(str(checkpoint), None, None, device)
    ds = build_dataset(cfg.dataset, cfg.data_root, split, train=False, num_classes=cfg.num_classes)
    parts = out.with_suffix(".parts")
    opts.setdefault("max_images", _EVAL_CAPS.get("max_images"))
    results = evaluate(model, ds, cfg.num_classes,
                       EvalOptions(split=split, progress=progress, protocol=cfg.dataset, amp=_EVAL_CAPS.get("amp"),
                                   resume_dir=parts, tag=f"{checkpoint.name}:{step}", **opts),
                       device=device, cam_cfg=cfg)
    results["checkpoint_step"] = step
    if current_ranks().is_main:
        atomic_write_json(out, results)
        shutil.rmtree(parts, ignore_errors=True)
    barrier()
    return results


# run-wide evaluation settings from the command line (--eval-amp, --max-images)
_EVAL_CAPS: dict = {}


def _is_main() -> bool:
    from locbe.ranks import current_ranks

    return current_ranks().is_main


def _env(run_dir: Path) -> dict:
    p = run_dir / "env.json"
    return json.loads(p.read_text()) if p.exists() else {}


def _panels(checkpoint: Path, cfg: TrainConfig, out_dir: Path, n: int = 4) -> None:
    import torch

    from locbe import cam as camlib
    from locbe.data import build_dataset, denormalize, voc_palette
    from locbe.device import resolve_device
    from locbe.eval.evaluate import load_model_for_eval, seg_logits, to_uint8_image
    from locbe.par import PAR
    from locbe.report import panel_columns, write_panel

    device = resolve_device(cfg.device)
    model, _ = load_model_for_eval(str(checkpoint), None, None, device)
    ds = build_dataset(cfg.dataset, cfg.data_root, cfg.val_split, train=False, num_classes=cfg.num_classes)
    par = PAR().to(device)
    with torch.no_grad():
        for i in range(min(n, len(ds))):
            item = ds[i]
            image, label = item["image"][None].to(device), item["cls_label"][None].to(device)
            cams, aux = camlib.multiscale_cam(model, image, scales=cfg.cam_scales)
            regions = camlib.region_partition(aux, label, low=cfg.low, high=cfg.high)[0]
            pseudo = camlib.refine_cams_with_par(par, denormalize(image), cams, label, item["img_box"][None].to(device),
                                                 high=cfg.high, low=cfg.low)[0]
            pred = seg_logits(model, image).argmax(1)[0]
            cam_max = (cams * label[:, :, None, None]).amax(1)[0]
            cols = panel_columns(to_uint8_image(image), cam_max.cpu().numpy(), regions.cpu().numpy(),
                                 pseudo.cpu().numpy(), pred.cpu().numpy(), item["mask"].numpy(), voc_palette())
            write_panel(out_dir / "panels" / f"{item['name']}.png", cols)


def acceptance_ratio(seg_miou: float, baselines: dict) -> float:
    """seg mIoU over the best trivial baseline (all background, or the image label on every pixel)."""
    best = max(baselines["all_background"]["miou"], baselines["image_label_everywhere"]["miou"])
    return seg_miou / max(best, 1e-9)


def reproduce_smoke(cfg: TrainConfig, reports: Path, ablation: bool, progress: bool,
                    force_new: bool = False) -> tuple[Path, float]:
    """Returns the tables' folder and the acceptance ratio (``acceptance_ratio``)."""
    import pandas as pd

    from locbe.data import VOC_CLASSES, build_dataset
    from locbe.data.synthetic import make_synthetic
    from locbe.eval.evaluate import trivial_baselines
    from locbe.report import lookup_reported, make_row, write_tables

    root = Path(cfg.data_root)
    if not (root / "synthetic.json").exists():  # an existing synthetic set (any size/seed) is used as is
        print(f"[data] generating the synthetic dataset in {root}")
        make_synthetic(root)
    checkpoint = _stage_train(cfg, progress, force_new)
    seg = _stage_eval(checkpoint, cfg, cfg.val_split, "val_single", progress)
    seg_ms = _stage_eval(checkpoint, cfg, cfg.val_split, "val_ms_crf", progress, multi_scale=True, crf=True)
    cam = _stage_eval(checkpoint, cfg, cfg.train_split, "train_cam", progress, cam=True,
                      max_images=min(80, _EVAL_CAPS.get("max_images") or 80))
    ablations = []
    if ablation:  # every rank trains and evaluates these (torchrun); rank 0 writes the table
        for name, switches in ABLATIONS.items():
            slug = name.split()[0].strip("+'").lower()
            acfg = dataclasses.replace(cfg, out_dir=str(Path(cfg.out_dir).parent / f"{Path(cfg.out_dir).name}-"
                                                       f"ablation-{slug}"), **switches)
            ck = _stage_train(acfg, progress, force_new)
            ablations.append((name, acfg, _stage_eval(ck, acfg, acfg.val_split, "val_single", progress)))
    if not _is_main():
        return reports, float("inf")  # rank 0 judges the acceptance line
    env = _env(Path(cfg.out_dir))
    val = build_dataset(cfg.dataset, cfg.data_root, cfg.val_split, train=False, num_classes=cfg.num_classes)
    base = trivial_baselines(val, cfg.num_classes)
    method = "LOC-BE" if cfg.use_loc and cfg.use_be else "ToCo-style"
    bb, ds = cfg.backbone, "synthetic"
    vs, ts = seg["split"], cam["split"]  # the splits actually evaluated
    rows = [
        make_row(method, bb, ds, vs, "seg mIoU (single scale)", seg["seg"]["miou"], env, status=NOT_COMPARABLE),
        make_row(method, bb, ds, vs, "seg mIoU (MS+CRF)", seg_ms["seg_crf"]["miou"], env, status=NOT_COMPARABLE),
        make_row(method, bb, ds, ts, "CAM mIoU", cam["cam"]["miou"], env, status=NOT_COMPARABLE),
        make_row(method, bb, ds, ts, "pseudo-label mIoU (PAR)", cam["pseudo_label_par"]["miou"], env,
                 status=NOT_COMPARABLE),
        make_row("trivial: all background", "-", ds, vs, "seg mIoU", base["all_background"]["miou"], env,
                 status="baseline"),
        make_row("trivial: image label everywhere", "-", ds, vs, "seg mIoU",
                 base["image_label_everywhere"]["miou"], env, status="baseline"),
    ]
    for ds_name in ("voc", "coco"):
        for split, metric, key in (("val", "seg mIoU", "seg_miou"), ("train", "CAM mIoU", "cam_miou")):
            rows.append(make_row("LOC-BE", "ViT-B/16", ds_name, split, metric, None, {},
                                 reported=lookup_reported("LOC-BE", ds_name, key, split=split),
                                 status=f"not run: dataset not found (locbe reproduce --preset {ds_name} "
                                        "--data-root DIR)"))
    for name, acfg, res in ablations:
        rows.append(make_row(f"ablation: {name}", bb, ds, acfg.val_split, "seg mIoU (single scale)",
                             res["seg"]["miou"], _env(Path(acfg.out_dir)), status=NOT_COMPARABLE))
    ratio = acceptance_ratio(seg["seg"]["miou"], base)
    line = ACCEPTANCE.get(cfg.preset)
    verdict = "no acceptance line for this preset" if line is None else (
        f"acceptance: >= {line}: {'passed' if ratio >= line else 'FAILED'}")
    per_class = pd.DataFrame({"class": VOC_CLASSES,
                              "seg (single)": [100 * v for v in seg["seg"]["iou"]],
                              "seg (MS+CRF)": [100 * v for v in seg_ms["seg_crf"]["iou"]],
                              "CAM (train)": [100 * v for v in cam["cam"]["iou"]]})
    notes = ["Synthetic VOC-layout data made by `locbe make-synthetic`; a health check of the pipeline, "
             "not a reproduction of the paper.",
             f"seg mIoU (single scale) / best trivial baseline = {ratio:.2f} ({verdict}).",
             f"Run directory: {cfg.out_dir}; config hash {env.get('config_hash')}; seed {cfg.seed}; "
             f"fidelity={cfg.fidelity} (docs/fidelity.md).",
             f"Evaluated: seg on `{vs}` ({seg['num_images']} images), CAM on `{ts}` ({cam['num_images']} images); "
             f"protocol `{seg_ms.get('protocol', 'smoke')}`; device {seg_ms.get('device')} x "
             f"{seg_ms.get('world_size', 1)} process(es); autocast {seg_ms.get('autocast', 'off')}.",
             "Panels (image | CAM | region partition | pseudo label | prediction | ground truth): `panels/*.png`."]
    out_dir = reports
    write_tables(out_dir, rows, per_class, f"locbe reproduce: {cfg.preset}", notes)
    _panels(checkpoint, cfg, out_dir)
    print((out_dir / "results.md").read_text())
    return out_dir, ratio


def final_eval_split(cfg: TrainConfig) -> str:
    """The split the final seg evaluation reads: the full ``val`` list for VOC and COCO (the authors' final
    evaluation; COCO's ``val_part`` is only the training-time validation subset), the preset's otherwise."""
    from locbe.eval.protocol import DEFAULT_EVAL_SPLIT

    return _EVAL_CAPS.get("split") or DEFAULT_EVAL_SPLIT.get(cfg.dataset, cfg.val_split)


def reproduce_real(cfg: TrainConfig, reports: Path, progress: bool, force_new: bool = False) -> Path:
    from locbe.data import COCO_CLASSES, VOC_CLASSES
    from locbe.report import make_row, write_tables

    ds_name = cfg.dataset
    rows = []
    env = {}
    root = Path(cfg.data_root) if cfg.data_root else None
    method = "LOC-BE" if cfg.use_loc and cfg.use_be else "ToCo"
    seg_split, cam_split = final_eval_split(cfg), cfg.train_split
    metrics = [(seg_split, "seg mIoU (MS+CRF)", "seg_miou", "MS+CRF"),
               (seg_split, "seg mIoU (single scale)", "seg_miou", "single scale"),
               (cam_split, "CAM mIoU", "cam_miou", None)]
    if root is None or not root.is_dir():  # before anything is written: existing results stay as they are
        raise MissingPathError(f"--data-root {'is required' if root is None else f'{root} does not exist'} for "
                               f"--preset {cfg.preset} ({ds_name} in VOC layout); nothing was run or written")
    checkpoint = _stage_train(cfg, progress, force_new)
    ms = _stage_eval(checkpoint, cfg, seg_split, "val_ms_crf", progress, multi_scale=True, crf=True)
    single = _stage_eval(checkpoint, cfg, seg_split, "val_single", progress)
    cam = _stage_eval(checkpoint, cfg, cam_split, "train_cam", progress, cam=True)
    if not _is_main():
        return reports
    env = _env(Path(cfg.out_dir))
    values = {"seg mIoU (MS+CRF)": ms["seg_crf"]["miou"], "seg mIoU (single scale)": single["seg"]["miou"],
              "CAM mIoU": cam["cam"]["miou"]}
    status = "ok" if cfg.pretrained else "pretrained weights not given: encoder from scratch, not comparable"
    if _EVAL_CAPS.get("rehearsal"):
        status = f"rehearsal ({_EVAL_CAPS['rehearsal']}): not comparable"
    for split, metric, key, proto in metrics:
        rows.append(make_row(method, cfg.backbone, ds_name, split, metric, values[metric], env,
                             reported=_reported(method, ds_name, key, proto, split),
                             status=status))
    import pandas as pd

    names = VOC_CLASSES if cfg.num_classes == 21 else COCO_CLASSES
    per_class = pd.DataFrame({"class": names, "seg (MS+CRF)": [100 * v for v in ms["seg_crf"]["iou"]]})
    notes = ["LOC-BE's README does not name the split of its figures; they are compared as stated.",
             f"Evaluated: seg on `{seg_split}` ({ms['num_images']} images), CAM on `{cam_split}` "
             f"({cam['num_images']} images); protocol `{ms['protocol']}` (locbe/eval/protocol.py); "
             f"device {ms.get('device')} x {ms.get('world_size', 1)} process(es); "
             f"autocast {ms.get('autocast', 'off')}; fidelity={cfg.fidelity} (docs/fidelity.md)."]
    if _EVAL_CAPS.get("rehearsal"):
        notes.append(f"Rehearsal: {_EVAL_CAPS['rehearsal']}; checks the code path, not the numbers.")
    write_tables(reports, rows, per_class, f"locbe reproduce: {cfg.preset}", notes)
    _panels(checkpoint, cfg, reports, n=min(4, _EVAL_CAPS.get("max_images") or 4))
    print((reports / "results.md").read_text())
    return reports


def _reported(method: str, dataset: str, key: str, protocol, split: str):
    """The published number for this row, or None where the evaluated list is not the one published numbers
    use (``val_part``: a subset of COCO val)."""
    from locbe.report import lookup_reported

    if split == "val_part":
        return None
    return lookup_reported(method, dataset, key, protocol, split=split)


def add_arguments(p, argv=()) -> None:
    from locbe.training.cli import preset_from_argv

    cfg = get_preset(preset_from_argv(argv, "smoke"))
    d = f"(preset {cfg.preset}: %(default)s)"
    p.add_argument("--preset", default=cfg.preset, choices=[n for n in PRESETS],
                   help="named configuration; the defaults below are this preset's")
    p.add_argument("--data-root", default=cfg.data_root,
                   help=f"dataset root; smoke presets make the synthetic set there if it is missing {d}")
    p.add_argument("--pretrained", default=cfg.pretrained, help=f"local ImageNet ViT weights (voc/coco) {d}")
    p.add_argument("--out", default=cfg.out_dir, help=f"run directory {d}")
    p.add_argument("--reports", help="write the tables to REPORTS/<preset>/ instead of <out>/report/")
    p.add_argument("--ablation", action="store_true", help="smoke: also train baseline / +LOC / +BE / full")
    p.add_argument("--force-new", action="store_true",
                   help="<out> holds a run made with another config: move it aside to <out>.old-<UTC time> "
                        "and start over")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config field, e.g. --set max_steps=600 (repeatable); "
                        "`locbe train --preset P --print-config` lists them")
    p.add_argument("--device", choices=DEVICE_CHOICES,
                   help=f"every stage runs here (preset {cfg.preset}: {cfg.device}; auto = cuda when available)")
    p.add_argument("--eval-amp", choices=["off", "bf16", "fp16"], default="off",
                   help="autocast for the evaluation passes (the table says which)")
    p.add_argument("--eval-split", help="split of the final seg evaluation (default: val, the full list)")
    p.add_argument("--max-steps", type=int, help="rehearsal: cap the training steps (the schedule shrinks with it)")
    p.add_argument("--max-images", type=int, help="rehearsal: cap the images of every evaluation")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args) -> int:
    try:
        cfg = get_preset(args.preset)
        changes = {k: v for k, v in (("data_root", args.data_root), ("pretrained", args.pretrained),
                                     ("out_dir", args.out), ("device", args.device)) if v is not None}
        cfg = apply_overrides(dataclasses.replace(cfg, **changes), args.overrides)
        if args.max_steps is not None:
            from locbe.rehearsal import cap_schedule

            cfg = cap_schedule(cfg, args.max_steps, args.max_images)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    _EVAL_CAPS.clear()
    _EVAL_CAPS.update(amp=None if args.eval_amp == "off" else args.eval_amp, split=args.eval_split,
                      max_images=args.max_images)
    if args.max_steps is not None or args.max_images is not None:
        _EVAL_CAPS["rehearsal"] = (f"{cfg.max_steps} steps, at most {args.max_images or 'all'} images per "
                                   f"evaluation, backbone {cfg.backbone}")
    progress = not args.no_progress
    reports = Path(args.reports) / cfg.preset if args.reports else Path(cfg.out_dir) / "report"
    if cfg.dataset != "synthetic":
        reproduce_real(cfg, reports, progress, args.force_new)
        return 0
    tables, ratio = reproduce_smoke(cfg, reports, args.ablation, progress, args.force_new)
    line = ACCEPTANCE.get(cfg.preset)
    if line is not None and ratio < line:
        raise AcceptanceError(f"acceptance failed: seg mIoU / best trivial baseline = {ratio:.2f} < {line} "
                              f"(tables in {tables})")
    return 0
