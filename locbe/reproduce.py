"""`locbe reproduce --preset {smoke,voc,coco} [--seeds N|LIST]`: data -> train -> eval -> report, resumable.

Each stage leaves an artefact and is skipped when it is already there: the synthetic dataset
(smoke), ``checkpoints/final.pth`` (training resumes from ``last.pth`` after an interruption), the
metrics JSON of each evaluation (tagged with the checkpoint's step), and finally the tables in
``<out>/report/`` (or ``--reports DIR``/<preset>/). Re-running a finished reproduction rewrites the
same tables. A run directory made with another config is not reused (``--force-new`` moves it aside).
Without ``--seeds`` one run in ``<out>``; with it, seed k in ``<out>/seed-<k>`` (``locbe.report.seeds``), one after
the other, and the tables give mean, spread and intervals over the seeds (``locbe.report.seed_report``). A seed that
fails is reported as failed; the others go on and are tabulated.
Exit codes (docs/runs.md): 0 when every stage ran and the preset's acceptance line held (on the mean over the
seeds), 3 when it did not; with a failed seed, that seed's exit code (after the others' tables are written).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from locbe.config import PRESETS, TrainConfig, apply_overrides, get_preset
from locbe.errors import AcceptanceError, ConfigError, MissingPathError
from locbe.runtime.device import DEVICE_CHOICES

DEFAULT_PRESET = "smoke"

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
    # the data were checked once for every stage (_check_data)
    return train(cfg, resume=resume, force_new=force_new, progress=progress, check_data=False,
                 tensorboard=_TRAIN_OPTS.get("tensorboard", False), command="reproduce").checkpoint


def _check_data(cfg: TrainConfig, eval_splits: list[str], progress: bool) -> None:
    """The fast check (headers, sizes) of every split the stages read, before the first stage (--no-check-data
    skips it). Bad files are listed one per line and the run stops with exit 2."""
    from locbe.data.check import check_before_training
    from locbe.train import training_splits

    check_before_training(cfg.dataset, cfg.data_root, training_splits(cfg) + eval_splits, cfg.num_classes,
                          progress=progress, is_main=_is_main())  # one line per split


def _stage_eval(checkpoint: Path, cfg: TrainConfig, split: str, key: str, progress: bool, **opts) -> dict:
    """One evaluation on ``cfg.device`` under the dataset's protocol (sharded when torchrun launched us),
    resumable: the per-image records live in ``eval/<key>.parts/`` until the metrics file is written."""
    import shutil

    import torch

    from locbe.data import build_dataset
    from locbe.eval.evaluate import EvalOptions, evaluate, load_model_for_eval
    from locbe.eval.sharded import barrier
    from locbe.runtime.device import resolve_device
    from locbe.runtime.fileio import atomic_write_json
    from locbe.runtime.ranks import current_ranks

    out = checkpoint.parent.parent / "eval" / f"{key}.json"
    if opts.get("crf"):
        opts.setdefault("crf_backend", _EVAL_CAPS.get("crf_backend") or "lattice")
    # tensors mapped to the meta device: only the step is read, not the weights and optimiser state
    step = int(torch.load(checkpoint, map_location="meta", weights_only=True, mmap=True)["step"])
    if out.exists():
        cached = json.loads(out.read_text())
        if cached.get("checkpoint_step") == step and cached.get("crf_backend") == opts.get("crf_backend"):
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


PANELS_NOTE = ("Panels: `panels/<image id>.png`, the first validation images, one per file: image | CAM | region "
               "partition | pseudo label | prediction | ground truth, titled with the image id and its image-level "
               "classes; under the tiles a CAM colour bar, the region key (0 background / 1 uncertain / 2 "
               "confident) and a legend naming every class colour shown.")

# run-wide evaluation settings from the command line (--eval-amp, --max-images)
_EVAL_CAPS: dict = {}
# run-wide training settings from the command line (--tensorboard)
_TRAIN_OPTS: dict = {}


def _is_main() -> bool:
    from locbe.runtime.ranks import current_ranks

    return current_ranks().is_main


def _env(run_dir: Path) -> dict:
    p = run_dir / "env.json"
    return json.loads(p.read_text()) if p.exists() else {}


def _panels(checkpoint: Path, cfg: TrainConfig, out_dir: Path, n: int = 4) -> None:
    import torch

    from locbe.data import COCO_CLASSES, VOC_CLASSES, build_dataset, denormalize, voc_palette
    from locbe.eval.evaluate import load_model_for_eval, seg_logits, to_uint8_image
    from locbe.method import cam as camlib
    from locbe.method.par import PAR
    from locbe.report.panels import Panel, image_classes_from_label, write_panel
    from locbe.runtime.device import resolve_device

    device = resolve_device(cfg.device)
    model, _ = load_model_for_eval(str(checkpoint), None, None, device)
    ds = build_dataset(cfg.dataset, cfg.data_root, cfg.val_split, train=False, num_classes=cfg.num_classes)
    par = PAR().to(device)
    class_names = VOC_CLASSES if cfg.num_classes == len(VOC_CLASSES) else COCO_CLASSES
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
            panel = Panel(item["name"], to_uint8_image(image), cam_max.cpu().numpy(), regions.cpu().numpy(),
                          pseudo.cpu().numpy(), pred.cpu().numpy(), item["mask"].numpy(),
                          image_classes_from_label(item["cls_label"]), class_names)
            write_panel(out_dir / "panels" / f"{item['name']}.png", panel, voc_palette())


def command_line() -> str:
    """This process's command as a user would type it (``locbe ...``), for the report: which command wrote it."""
    import shlex
    import sys

    if Path(sys.argv[0]).name not in ("locbe", "cli.py", "__main__.py"):
        return "locbe.reproduce called from Python"
    return "locbe " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def acceptance_ratio(seg_miou: float, baselines: dict) -> float:
    """seg mIoU over the best trivial baseline (all background, or the image label on every pixel)."""
    best = max(baselines["all_background"]["miou"], baselines["image_label_everywhere"]["miou"])
    return seg_miou / max(best, 1e-9)


def _smoke_stages(cfg: TrainConfig, progress: bool, force_new: bool) -> Path:
    checkpoint = _stage_train(cfg, progress, force_new)
    _stage_eval(checkpoint, cfg, cfg.val_split, "val_single", progress)
    _stage_eval(checkpoint, cfg, cfg.val_split, "val_ms_crf", progress, multi_scale=True, crf=True)
    _stage_eval(checkpoint, cfg, cfg.train_split, "train_cam", progress, cam=True,
                max_images=min(80, _EVAL_CAPS.get("max_images") or 80))
    return checkpoint


def _ablation_stages(cfg: TrainConfig, progress: bool, force_new: bool) -> Path:
    checkpoint = _stage_train(cfg, progress, force_new)
    _stage_eval(checkpoint, cfg, cfg.val_split, "val_single", progress)
    return checkpoint


def _real_stages(cfg: TrainConfig, progress: bool, force_new: bool) -> Path:
    seg_split = final_eval_split(cfg)
    checkpoint = _stage_train(cfg, progress, force_new)
    _stage_eval(checkpoint, cfg, seg_split, "val_ms_crf", progress, multi_scale=True, crf=True)
    _stage_eval(checkpoint, cfg, seg_split, "val_single", progress)
    _stage_eval(checkpoint, cfg, cfg.train_split, "train_cam", progress, cam=True)
    return checkpoint


def seed_configs(cfg: TrainConfig, seeds: list[int] | None) -> list[TrainConfig]:
    """One config per seed: ``cfg`` itself in its ``out_dir`` without ``--seeds`` (one run, as before),
    else seed k in ``<out>/seed-<k>``."""
    from locbe.report.seeds import seed_dir

    if seeds is None:
        return [cfg]
    return [dataclasses.replace(cfg, seed=k, out_dir=str(seed_dir(cfg.out_dir, k))) for k in seeds]


def _run_seed(stages, cfg: TrainConfig, progress: bool, force_new: bool, isolate: bool,
              label: str) -> tuple[dict, Path | None]:
    """Run one seed's stages; returns its record (``locbe.report.seeds``) and checkpoint. With ``isolate`` (``--seeds``)
    an error fails this seed only (recorded with its exit code, one line on stderr; the traceback too when it is
    a bug); a stop by signal or Ctrl-C still stops everything."""
    import sys
    import traceback

    from locbe.errors import EXIT_FAILURE, Interrupted, LocbeError, one_line
    from locbe.report.seeds import failed_record, run_record

    print(f"[{label}] {cfg.out_dir}")
    if not isolate:
        checkpoint = stages(cfg, progress, force_new)
        return run_record(cfg.out_dir, cfg.seed), checkpoint
    try:
        checkpoint = stages(cfg, progress, force_new)
    except (Interrupted, KeyboardInterrupt):
        raise
    except Exception as e:
        if not isinstance(e, LocbeError | FileNotFoundError | PermissionError):
            traceback.print_exc()
        code = getattr(e, "exit_code", EXIT_FAILURE)
        print(f"[{label}] FAILED (exit {code}): {one_line(e)}; the other seeds go on", file=sys.stderr)
        return failed_record(cfg.out_dir, cfg.seed, one_line(e), code), None
    return run_record(cfg.out_dir, cfg.seed), checkpoint


def _run_seeds(stages, cfgs: list[TrainConfig], progress: bool, force_new: bool, isolate: bool,
               name: str = "seed") -> tuple[list[dict], Path | None]:
    """Every seed's record (in order) and the first finished seed's checkpoint (for the panels)."""
    records, first = [], None
    from locbe.runtime.numerics import pinned_threads

    for i, c in enumerate(cfgs):
        with pinned_threads(c.cpu_numerics):  # training and evaluation alike
            rec, ck = _run_seed(stages, c, progress, force_new, isolate, f"{name} {c.seed} ({i + 1}/{len(cfgs)})")
        records.append(rec)
        first = first or ck
    return records, first


def _evaluated_note(rec: dict, seg_metric: str, cam_metric: str) -> str:
    seg, cam = rec["metrics"][seg_metric], rec["metrics"][cam_metric]
    ms = rec["metrics"].get("seg mIoU (MS+CRF)", seg)
    return (f"Evaluated: seg on `{seg['split']}` ({seg['num_images']} images), CAM on `{cam['split']}` "
            f"({cam['num_images']} images); protocol `{ms['protocol']}`; device {ms.get('device')} x "
            f"{ms.get('world_size', 1)} process(es); autocast {ms.get('autocast', 'off')}"
            + (f"; CRF backend `{ms['crf_backend']}`" if ms.get("crf_backend") else ""))


def _raise_failed(records: list[dict], tables: Path) -> None:
    """Some seeds failed: a one-line error with the first failed seed's exit code (the others' tables are written
    before, when there are others)."""
    from locbe.errors import LocbeError

    failed = [r for r in records if r["status"] != "ok"]
    if failed:
        err = LocbeError(f"{len(failed)} of {len(records)} seed(s) failed ("
                         + "; ".join(f"seed {r['seed']}: {r['error']}" for r in failed)
                         + f"); tables of the others in {tables}; the same command retries the failed ones")
        err.exit_code = failed[0]["exit_code"]
        raise err


def reproduce_smoke(cfg: TrainConfig, reports: Path, ablation: bool, progress: bool, force_new: bool = False,
                    seeds: list[int] | None = None, check_data: bool = True) -> tuple[Path, float, list[dict]]:
    """Returns the tables' folder, the acceptance ratio (``acceptance_ratio``; of the mean over the seeds) and
    the seeds' records."""
    from locbe.data import VOC_CLASSES, build_dataset
    from locbe.data.synthetic import make_synthetic
    from locbe.eval.evaluate import trivial_baselines
    from locbe.report.seed_report import Row, metric_row, write_seed_report
    from locbe.report.seeds import seed_dir
    from locbe.report.tables import lookup_reported

    root = Path(cfg.data_root)
    if not (root / "synthetic.json").exists():  # an existing synthetic set (any size/seed) is used as is
        print(f"[data] generating the synthetic dataset in {root}")
        make_synthetic(root)
    if check_data:
        _check_data(cfg, [cfg.val_split, cfg.train_split], progress)
    isolate = seeds is not None
    cfgs = seed_configs(cfg, seeds)
    records, checkpoint = _run_seeds(_smoke_stages, cfgs, progress, force_new, isolate)
    ablations = []
    if ablation:  # every rank trains and evaluates these (torchrun); rank 0 writes the table
        for name, switches in ABLATIONS.items():
            slug = name.split()[0].strip("+'").lower()
            variant = str(Path(cfg.out_dir).parent / f"{Path(cfg.out_dir).name}-ablation-{slug}")
            if not isolate:  # one seed: every row trained in <out>-ablation-<slug> (as before --seeds existed)
                acfgs = [dataclasses.replace(cfg, out_dir=variant, **switches)]
            elif not switches:  # the full method is the main run: its seeds are not trained twice
                ablations.append((name, records))
                continue
            else:
                acfgs = [dataclasses.replace(c, out_dir=str(seed_dir(variant, c.seed)), **switches) for c in cfgs]
            ablations.append((name, _run_seeds(_ablation_stages, acfgs, progress, force_new, isolate,
                                               f"ablation {slug}, seed")[0]))
    if not _is_main():
        return reports, float("inf"), records  # rank 0 judges the acceptance line
    ok = [r for r in records if r["status"] == "ok"]
    if not ok:
        _raise_failed(records, reports)
    env = ok[0]["env"]
    val = build_dataset(cfg.dataset, cfg.data_root, cfg.val_split, train=False, num_classes=cfg.num_classes)
    base = trivial_baselines(val, cfg.num_classes)
    method = "LOC-BE" if cfg.use_loc and cfg.use_be else "ToCo-style"
    bb, ds = cfg.backbone, "synthetic"
    split = {m: ok[0]["metrics"][m]["split"] for m in ok[0]["metrics"]}  # the splits actually evaluated
    rows = [metric_row(method, bb, ds, split[m], m, records, status=NOT_COMPARABLE)
            for m in ("seg mIoU (single scale)", "seg mIoU (MS+CRF)", "CAM mIoU", "pseudo-label mIoU (PAR)")]
    vs = split["seg mIoU (single scale)"]
    for label, key in (("trivial: all background", "all_background"),
                       ("trivial: image label everywhere", "image_label_everywhere")):
        rows.append(Row(label, "-", ds, vs, "seg mIoU", [(ok[0], 100 * base[key]["miou"])], status=NOT_COMPARABLE,
                        per_seed=False, verdict=None if len(records) == 1 else "same for every seed (no training)"))
    for ds_name in ("voc", "coco"):
        for sp, metric, key in (("val", "seg mIoU", "seg_miou"), ("train", "CAM mIoU", "cam_miou")):
            rows.append(Row("LOC-BE", "ViT-B/16", ds_name, sp, metric,
                            reported=lookup_reported("LOC-BE", ds_name, key, split=sp),
                            status=f"locbe reproduce --preset {ds_name} --data-root DIR"))
    for name, recs in ablations:
        rows.append(metric_row(f"ablation: {name}", bb, ds, vs, "seg mIoU (single scale)", recs,
                               status=NOT_COMPARABLE, plot=False))
    seg_values = [r["metrics"]["seg mIoU (single scale)"]["value"] / 100 for r in ok]
    ratio = acceptance_ratio(sum(seg_values) / len(seg_values), base)
    line = ACCEPTANCE.get(cfg.preset)
    verdict = acceptance_verdict(ratio, line, len(ok))
    # the baseline is the same for every seed, so the mean of the seeds' ratios is the ratio of the mean
    ratio_runs = [(r, None if r["status"] != "ok" else
                   100 * acceptance_ratio(r["metrics"]["seg mIoU (single scale)"]["value"] / 100, base))
                  for r in records]
    rows.insert(6, Row("acceptance ratio", bb, ds, vs, ACCEPTANCE_METRIC, [(r, None if v is None else v / 100)
                                                               for r, v in ratio_runs],
                       status=NOT_COMPARABLE, verdict=verdict))
    where = (f"Run directory: {cfg.out_dir}; config hash {env.get('config_hash')}; seed {cfg.seed}" if not isolate
             else f"Run directories: {cfg.out_dir}/seed-<k> (config hashes in Environment)")
    notes = ["Synthetic VOC-layout data made by `locbe make-synthetic`; a health check of the pipeline, "
             "not a reproduction of the paper.",
             f"Acceptance ratio: seg mIoU (single scale) over the best trivial baseline (the higher of 'all "
             f"background' and 'image label everywhere'); the line is {line}"
             + ("" if len(ok) == 1 else ", on the mean over the seeds") + f": {ratio:.2f}, {verdict}.",
             f"{where}; fidelity={cfg.fidelity} (docs/fidelity.md).",
             _evaluated_note(ok[0], "seg mIoU (single scale)", "CAM mIoU") + ".",
             PANELS_NOTE + ("" if len(ok) == 1 else f" Panels of seed {ok[0]['seed']}.")]
    out_dir = reports
    if ablation and isolate:
        from locbe.report.compare import write_comparison

        full = next((name, recs) for name, recs in ablations if not ABLATIONS[name])
        variants = [(name, recs) for name, recs in ablations if ABLATIONS[name]]
        write_comparison(out_dir, "ablation", "locbe reproduce: ablation, each row against the full method",
                         full, variants, metrics=["seg mIoU (single scale)"])
        notes.append("Ablation, each row against the full method (difference of means, Welch's t-test): "
                     "`ablation.md`.")
    notes.append(f"Written by `{command_line()}`.")
    write_seed_report(out_dir, f"locbe reproduce: {cfg.preset}", rows, records, notes, VOC_CLASSES,
                      ["seg (single)", "seg (MS+CRF)", "CAM (train)"])
    _panels(checkpoint, cfg, out_dir)
    print_summary(out_dir, records, ["seg mIoU (single scale)", "seg mIoU (MS+CRF)", "CAM mIoU",
                                     "pseudo-label mIoU (PAR)"],
                  f"acceptance ratio {ratio:.2f} = seg mIoU (single scale) / best trivial baseline "
                  f"({100 * _best(base):.2f}); {verdict}")
    return out_dir, ratio, records


ACCEPTANCE_METRIC = "seg mIoU (single scale) / best trivial"


def _best(baselines: dict) -> float:
    return max(baselines["all_background"]["miou"], baselines["image_label_everywhere"]["miou"])


def acceptance_verdict(ratio: float, line: float | None, n_ok: int) -> str:
    """"acceptance: >= 2.0: passed" / "...: FAILED" ("on the mean" with several seeds)."""
    if line is None:
        return "no acceptance line for this preset"
    judged = f"acceptance: >= {line}" + ("" if n_ok == 1 else " on the mean")
    return f"{judged}: {'passed' if ratio >= line else 'FAILED'}"


def print_summary(out_dir: Path, records: list[dict], metrics: list[str], verdict: str | None = None,
                  published: dict[str, str] | None = None) -> None:
    """The end of ``reproduce`` on the terminal: the headline metrics (one value, or mean +- std over the seeds;
    ``published``: metric -> "published X: verdict"), the acceptance verdict, and where the report is; the
    report itself is ``results.md``."""
    import statistics

    ok = [r for r in records if r["status"] == "ok"]
    lines = [""]
    many = len(ok) > 1
    head = f"locbe reproduce: {len(ok)} of {len(records)} seed(s) finished" if len(records) > 1 else (
        "locbe reproduce: done")
    lines.append(head)
    width = max(len(m) for m in metrics)
    for m in metrics:
        values = [r["metrics"][m]["value"] for r in ok if m in r["metrics"]]
        if not values:
            continue
        split = next(r["metrics"][m]["split"] for r in ok if m in r["metrics"])
        text = (f"{statistics.mean(values):6.2f} +- {statistics.stdev(values):.2f} (mean +- std over "
                f"{len(values)} seeds)" if many and len(values) > 1 else f"{values[0]:6.2f}")
        lines.append(f"  {m:<{width}}  {text}  [{split}]" + (f"  {published[m]}" if published and m in published
                                                               else ""))
    if verdict:
        lines.append(f"  {verdict}")
    report = out_dir / "results.md"
    lines.append(f"report: {report}" + (f" (training curves: {out_dir / 'curves.png'})"
                                        if (out_dir / "curves.png").is_file() else ""))
    print("\n".join(lines))


def final_eval_split(cfg: TrainConfig) -> str:
    """The split the final seg evaluation reads: the full ``val`` list for VOC and COCO (the authors' final
    evaluation; COCO's ``val_part`` is only the training-time validation subset), the preset's otherwise."""
    from locbe.eval.protocol import DEFAULT_EVAL_SPLIT

    return _EVAL_CAPS.get("split") or DEFAULT_EVAL_SPLIT.get(cfg.dataset, cfg.val_split)


def reproduce_real(cfg: TrainConfig, reports: Path, progress: bool, force_new: bool = False,
                   seeds: list[int] | None = None, check_data: bool = True) -> tuple[Path, list[dict]]:
    from locbe.data import COCO_CLASSES, VOC_CLASSES
    from locbe.report.seed_report import metric_row, write_seed_report

    ds_name = cfg.dataset
    root = Path(cfg.data_root) if cfg.data_root else None
    method = "LOC-BE" if cfg.use_loc and cfg.use_be else "ToCo"
    seg_split, cam_split = final_eval_split(cfg), cfg.train_split
    metrics = [(seg_split, "seg mIoU (MS+CRF)", "seg_miou", "MS+CRF"),
               (seg_split, "seg mIoU (single scale)", "seg_miou", "single scale"),
               (cam_split, "CAM mIoU", "cam_miou", None)]
    if root is None or not root.is_dir():  # before anything is written: existing results stay as they are
        raise MissingPathError(f"--data-root {'is required' if root is None else f'{root} does not exist'} for "
                               f"--preset {cfg.preset} ({ds_name} in VOC layout); nothing was run or written")
    if check_data:
        _check_data(cfg, [seg_split, cam_split], progress)
    cfgs = seed_configs(cfg, seeds)
    records, checkpoint = _run_seeds(_real_stages, cfgs, progress, force_new, isolate=seeds is not None)
    if not _is_main():
        return reports, records
    ok = [r for r in records if r["status"] == "ok"]
    if not ok:
        _raise_failed(records, reports)
    status = "ok" if cfg.pretrained else "pretrained weights not given: encoder from scratch, not comparable"
    if _EVAL_CAPS.get("rehearsal"):
        status = f"rehearsal ({_EVAL_CAPS['rehearsal']}): not comparable"
    rows = [metric_row(method, cfg.backbone, ds_name, split, metric, records,
                       reported=_reported(method, ds_name, key, proto, split), status=status)
            for split, metric, key, proto in metrics]
    names = VOC_CLASSES if cfg.num_classes == 21 else COCO_CLASSES
    notes = ["LOC-BE's README does not name the split of its figures; they are compared as stated.",
             _evaluated_note(ok[0], "seg mIoU (MS+CRF)", "CAM mIoU") + " (locbe/eval/protocol.py); "
             f"fidelity={cfg.fidelity} (docs/fidelity.md).", PANELS_NOTE]
    if _EVAL_CAPS.get("rehearsal"):
        notes.append(f"Rehearsal: {_EVAL_CAPS['rehearsal']}; checks the code path, not the numbers.")
    notes.append(f"Written by `{command_line()}`.")
    write_seed_report(reports, f"locbe reproduce: {cfg.preset}", rows, records, notes, names, ["seg (MS+CRF)"])
    _panels(checkpoint, cfg, reports, n=min(4, _EVAL_CAPS.get("max_images") or 4))
    from locbe.report import stats

    published = {r.metric: f"published {r.reported:.1f}: {stats.reported_verdict(r.reported, r.summary())}"
                 for r in rows if r.reported is not None and r.values()}
    print_summary(reports, records, [m for _, m, _, _ in metrics], published=published)
    return reports, records


def _reported(method: str, dataset: str, key: str, protocol, split: str):
    """The published number for this row, or None where the evaluated list is not the one published numbers
    use (``val_part``: a subset of COCO val)."""
    from locbe.report.tables import lookup_reported

    if split == "val_part":
        return None
    return lookup_reported(method, dataset, key, protocol, split=split)


def add_arguments(p, argv=()) -> None:
    from locbe.eval.cli import CRF_BACKENDS
    from locbe.training.cli import preset_from_argv

    cfg = get_preset(preset_from_argv(argv, DEFAULT_PRESET))
    d = f"(preset {cfg.preset}: %(default)s)"
    p.add_argument("--preset", default=cfg.preset, choices=[n for n in PRESETS],
                   help="named configuration; the defaults below are this preset's")
    p.add_argument("--data-root", default=cfg.data_root,
                   help=f"dataset root; smoke presets make the synthetic set there if it is missing {d}")
    p.add_argument("--pretrained", default=cfg.pretrained, help=f"local ImageNet ViT weights (voc/coco) {d}")
    p.add_argument("--out", default=cfg.out_dir, help=f"run directory {d}")
    p.add_argument("--reports", help="write the tables to REPORTS/<preset>/ instead of <out>/report/")
    p.add_argument("--seeds", metavar="N|LIST",
                   help="train and evaluate several seeds, each in <out>/seed-<k>, and tabulate mean, spread and "
                        "intervals: a count (3: seeds 0,1,2) or a list (0,4,7; 5, for seed 5 alone); without it "
                        "one run in <out> with the config's seed (--set seed=K)")
    p.add_argument("--ablation", action="store_true",
                   help="smoke: also train baseline / +LOC / +BE / full; with --seeds every row for every seed, "
                        "compared with the full method in ablation.md")
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
    p.add_argument("--crf-backend", choices=CRF_BACKENDS, default=CRF_BACKENDS[0],
                   help="the MS+CRF evaluation's CRF: 'lattice' (locbe's, on the run's device) or 'pydensecrf' "
                        "(the authors' library); the tables say which ran")
    p.add_argument("--eval-split", help="split of the final seg evaluation (default: val, the full list)")
    p.add_argument("--max-steps", type=int,
                   help="rehearsal: cap the training steps (the schedule shrinks with it, as with "
                        "`locbe train --max-steps`)")
    p.add_argument("--max-images", type=int, help="rehearsal: cap the images of every evaluation")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--tensorboard", action="store_true",
                   help="also write each run's logged scalars (losses, lr) as TensorBoard events in "
                        "<run>/tensorboard/ (needs the optional extra: pip install -e \".[tensorboard]\")")
    p.add_argument("--no-check-data", action="store_true",
                   help="skip the check of every image's and mask's header before the first stage (locbe check-data)")


def run(args) -> int:
    try:
        cfg = get_preset(args.preset)
        changes = {k: v for k, v in (("data_root", args.data_root), ("pretrained", args.pretrained),
                                     ("out_dir", args.out), ("device", args.device)) if v is not None}
        cfg = apply_overrides(dataclasses.replace(cfg, **changes), args.overrides)
        if args.max_steps is not None:  # the same meaning as `locbe train --max-steps` (locbe.training.cli)
            from locbe.training.cli import with_max_steps

            cfg = with_max_steps(cfg, args.max_steps, args.max_images)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    _TRAIN_OPTS.clear()
    _TRAIN_OPTS["tensorboard"] = args.tensorboard
    if args.tensorboard:
        from locbe.training.tensorboard import require_tensorboard

        require_tensorboard()  # before the data are made or checked
    _EVAL_CAPS.clear()
    _EVAL_CAPS.update(amp=None if args.eval_amp == "off" else args.eval_amp, split=args.eval_split,
                      max_images=args.max_images, crf_backend=args.crf_backend)
    if args.max_steps is not None or args.max_images is not None:
        _EVAL_CAPS["rehearsal"] = (f"{cfg.max_steps} steps, at most {args.max_images or 'all'} images per "
                                   f"evaluation, backbone {cfg.backbone}")
    from locbe.report.seeds import parse_seeds

    seeds = None if args.seeds is None else parse_seeds(args.seeds)
    # one process per run directory (locbe.runtime.runlock): held for every stage; torchrun: rank 0 holds it
    from locbe.runtime.runlock import run_dir_lock

    with run_dir_lock(cfg.out_dir, "locbe reproduce", take=int(os.environ.get("RANK", "0")) == 0):
        return _run(args, cfg, seeds)


def _run(args, cfg: TrainConfig, seeds: list[int] | None) -> int:
    progress = not args.no_progress
    reports = Path(args.reports) / cfg.preset if args.reports else Path(cfg.out_dir) / "report"
    if cfg.dataset != "synthetic":
        tables, records = reproduce_real(cfg, reports, progress, args.force_new, seeds,
                                         check_data=not args.no_check_data)
        _raise_failed(records, tables)
        return 0
    tables, ratio, records = reproduce_smoke(cfg, reports, args.ablation, progress, args.force_new, seeds,
                                                   check_data=not args.no_check_data)
    _raise_failed(records, tables)
    line = ACCEPTANCE.get(cfg.preset)
    if line is not None and ratio < line:
        what = "" if seeds is None or len(records) == 1 else f" (mean over {len(records)} seeds)"
        raise AcceptanceError(f"acceptance failed: seg mIoU / best trivial baseline = {ratio:.2f}{what} < {line} "
                              f"(tables in {tables})")
    return 0
