"""Command line: ``cellmask segment | evaluate | train | export | export-geojson | models | demo``
(also ``python -m cellmask``)."""

from __future__ import annotations

import argparse
import logging
import sys

from cellmask.errors import CellmaskError

log = logging.getLogger("cellmask")


def _add_train(sub: argparse._SubParsersAction) -> None:
    from cellmask.config import TrainConfig

    d = TrainConfig()
    p = sub.add_parser("train", help="train or fine-tune a model on folders of images and masks")
    p.add_argument("--data", default=d.data, help="folder with images/, masks/, splits/")
    p.add_argument("--split", default=d.split, help="split list (path, or relative to --data)")
    p.add_argument("--add-data", nargs=3, action="append", default=[],
                   metavar=("DATA", "SPLIT", "SHARE"),
                   help="another annotated set giving SHARE (0-1) of the crops (repeatable)")
    p.add_argument("--tissue-aug", type=float, default=d.tissue_aug, metavar="P",
                   help="probability that a fluorescence crop gets H&E-like chromatin, "
                        "cytoplasm and stroma drawn around its nuclei (0: never)")
    p.add_argument("--out", default=d.out, help="run folder (checkpoint, weights, log)")
    p.add_argument("--iterations", type=int, default=d.iterations)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--crop", type=int, default=d.crop)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--checkpoint-minutes", type=float, default=d.checkpoint_minutes)
    p.add_argument("--max-minutes", type=float, default=d.max_minutes,
                   help="stop with a checkpoint after this many minutes (0: no limit)")
    p.add_argument("--device", default=d.device, help="auto, cpu or cuda")
    p.add_argument("--threads", type=int, default=d.threads, help="torch CPU threads (0: torch's)")
    p.add_argument("--workers", type=int, default=d.workers, help="data-loading processes")
    p.add_argument("--resume", action="store_true", help="continue OUT/checkpoint.safetensors")
    p.add_argument("--init", help="fine-tune from these .safetensors weights")
    p.add_argument("--train-only", nargs="+", default=[], metavar="PREFIX",
                   help="fine-tune only the parameters named PREFIX... (e.g. "
                        "roi_heads.mask_head roi_heads.mask_predictor); the rest stays frozen")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="change a numeric field of the model configuration (with --init: "
                        "one that keeps the weights' shapes, e.g. mask_roi_size=10, or changes "
                        "only the --train-only parts, e.g. mask_head_layers=64,64)")
    p.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from cellmask.config import TrainConfig
    from cellmask.train.export import parse_settings
    from cellmask.train.loop import train

    cfg = TrainConfig(data=args.data, split=args.split, out=args.out, iterations=args.iterations,
                      batch_size=args.batch_size, crop=args.crop, lr=args.lr, warmup=args.warmup,
                      seed=args.seed, checkpoint_minutes=args.checkpoint_minutes,
                      max_minutes=args.max_minutes, device=args.device, threads=args.threads,
                      workers=args.workers, train_only=tuple(args.train_only),
                      tissue_aug=args.tissue_aug,
                      more_data=tuple((data, split, float(share))
                                      for data, split, share in args.add_data))
    changes = parse_settings(args.set, inference_only=False)
    path = train(cfg, resume=args.resume, init=args.init, changes=changes,
                 progress=not args.quiet)
    log.info("weights written to %s", path)
    return 0


def _add_segment(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("segment", help="segment images (OME-Zarr, Zarr, TIFF/SVS, PNG, .npy): "
                       "one, or a batch (a folder, a quoted glob, several files)")
    p.add_argument("input", nargs="+")
    p.add_argument("--out", help="output OME-Zarr (default: labels/cellmask inside an input "
                   "OME-Zarr, else INPUT name + .cellmask.ome.zarr); for a batch, the folder "
                   "of the outputs and of the combined measurements table")
    p.add_argument("--model", default="nuclei", help="shipped model name or .safetensors file")
    p.add_argument("--scale", type=float, help="resize factor before the network")
    p.add_argument("--diameter", type=float,
                   help="typical nucleus diameter in pixels (instead of --scale)")
    p.add_argument("--pixel-size", type=float, metavar="UM",
                   help="pixel size in um, overriding the input's metadata")
    p.add_argument("--modality", default="auto", choices=["auto", "fluorescence", "brightfield"],
                   help="auto (default): decided once from the image; brightfield separates "
                        "the stains (H&E) once per image and segments the hematoxylin")
    p.add_argument("--no-tissue-mask", action="store_true",
                   help="brightfield: segment every tile, not only those with tissue")
    p.add_argument("--no-image", action="store_true",
                   help="leave the input image out of a new output store (labels and tables "
                        "only; the labels name the input as their source)")
    p.add_argument("--tile", type=int, default=1024)
    p.add_argument("--halo", type=int, default=None, metavar="PX",
                   help="context read around each tile, level-0 px (default: from the "
                        "network's receptive field and the objects' size at the run's scale; "
                        "64 for the shipped models at scale 1)")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--workers", type=int,
                   help="tile batches in the network at once (default: 2 on a multi-core CPU, "
                        "1 on a GPU)")
    p.add_argument("--precision", default=None,
                   choices=["auto", "fp32", "mixed", "bf16", "fp16", "int8"],
                   help="network arithmetic (default auto: mixed where the hardware has native "
                        "half precision, else int8 on CPUs for calibrated weights, else fp32)")
    _add_augment(p)
    p.add_argument("--scheduler", help="address of a dask.distributed scheduler")
    p.add_argument("--axes", help="axes of the input, e.g. CYX (default: from metadata)")
    p.add_argument("--channel", type=int, help="channel to segment")
    p.add_argument("--z", type=int, help="z plane")
    p.add_argument("--t", type=int, help="time point")
    p.add_argument("--name", default="cellmask", help="name of the labels image")
    p.add_argument("--skip-corrupt", action="store_true",
                   help="segment around unreadable chunks (read as 0) and report them")
    p.add_argument("--overwrite", action="store_true",
                   help="replace cellmask's earlier labels of this name (another input, other "
                        "settings, or edited by hand) instead of refusing")
    p.add_argument("--cell-expansion", type=float, default=0.0, metavar="UM",
                   help="grow each nucleus into a cell by UM micrometres (labels NAME_cells, "
                        "NAME_cytoplasm; every channel measured per compartment)")
    p.add_argument("--cell-boundary", metavar="CHANNEL",
                   help="bound the grown cells by this channel (index or OME name) of a "
                        "membrane or cytoplasm stain: each nucleus claims the pixels it "
                        "reaches at least cost over that stain, within --cell-expansion")
    p.add_argument("--cell-boundary-kind", choices=("membrane", "cytoplasm"),
                   default="membrane",
                   help="what --cell-boundary shows: membrane (bright between cells, the "
                        "default) or cytoplasm (bright inside them)")
    p.add_argument("--measurements", metavar="LIST",
                   help="comma-separated measurements of the compartment table, e.g. "
                        "area,mean,median (default: all)")
    p.set_defaults(func=_run_segment)


def time_split(t: dict[str, float]) -> str:
    """One line of a run's stages (seconds) and the share of the wall time outside the
    network (worker-seconds of the network are spread over the tile stage's wall time)."""
    parts = [f"{k} {t[k]:.2f} s" for k in ("setup", "tiles", "prepare", "network", "masks",
                                            "read_wait", "records", "stitch_paint", "cells",
                                            "measure", "total") if k in t]
    total = t.get("total", 0.0)
    network = t.get("network_wall", 0.0)
    if total > 0:
        parts.append(f"outside the network {100 * (1 - network / total):.0f}%")
    return ", ".join(parts)


def _is_batch(inputs: list[str]) -> bool:
    from pathlib import Path

    from cellmask.batch import _is_store

    if len(inputs) > 1:
        return True
    path = Path(inputs[0])
    return (path.is_dir() and not _is_store(path)) or (
        not path.exists() and any(ch in inputs[0] for ch in "*?["))


def _settings(args: argparse.Namespace) -> dict:
    return dict(tile=args.tile, halo=args.halo, batch_size=args.batch_size, axes=args.axes,
                channel=args.channel, z=args.z, t=args.t, scale=args.scale,
                diameter=args.diameter, pixel_size=args.pixel_size, modality=args.modality,
                tissue_mask=not args.no_tissue_mask, write_image=not args.no_image,
                name=args.name,
                skip_corrupt=args.skip_corrupt, workers=args.workers, overwrite=args.overwrite,
                cell_expansion=args.cell_expansion, cell_boundary=args.cell_boundary,
                cell_boundary_kind=args.cell_boundary_kind,
                measurements=tuple(m.strip() for m in args.measurements.split(",") if m.strip())
                if args.measurements else None)


def _add_augment(p: argparse.ArgumentParser) -> None:
    p.add_argument("--augment", nargs="?", type=int, const=8, default=None, metavar="VIEWS",
                   help="test-time augmentation: the network sees each tile in VIEWS views "
                        "(2, 4 or 8, default 8: mirrored and transposed) and their detections "
                        "are fused; more accurate, VIEWS times the network time")


def _load(args: argparse.Namespace):
    """The model of a segment or evaluate command, with its precision and views."""
    from cellmask.model.segmenter import load_model

    model = load_model(args.model, device=args.device,
                       **({"precision": args.precision} if args.precision else {}))
    return model.with_config(test_views=args.augment) if args.augment else model


def _run_batch(args: argparse.Namespace) -> int:
    from cellmask.batch import segment_batch
    from cellmask.errors import InputError

    if not args.out:
        raise InputError("a batch needs --out FOLDER for its outputs and combined table")
    model = _load(args) if args.precision or args.augment else args.model
    batch = segment_batch(args.input, args.out, model=model, device=args.device,
                          progress=not args.quiet, **_settings(args))
    for key, why in batch.failed.items():
        print(f"cellmask: error: {key}: {why}", file=sys.stderr)
    log.info("%d of %d images segmented; combined measurements %s", len(batch.results),
             len(batch.results) + len(batch.failed), batch.table_path)
    return 2 if batch.failed else 0


def _run_segment(args: argparse.Namespace) -> int:
    from cellmask.pipeline import check_output, open_source, segment_zarr

    if _is_batch(args.input):
        return _run_batch(args)
    # the input and the output are checked before torch and the model load (seconds)
    source = open_source(args.input[0], axes=args.axes, channel=args.channel, z=args.z,
                         t=args.t, pixel_size=args.pixel_size)
    check_output(source, args.out, args.name, overwrite=args.overwrite)
    client = None
    if args.scheduler:
        from dask.distributed import Client

        client = Client(args.scheduler)
    model = _load(args)
    result = segment_zarr(source, args.out, model=model, device=args.device, client=client,
                          progress=not args.quiet, **_settings(args))
    for chunk in result.corrupt:
        print(f"cellmask: warning: corrupt input {chunk} was segmented as empty", file=sys.stderr)
    log.info("%d objects in %.1f s; labels %s, measurements %s", result.objects,
             result.timings["total"], result.path, result.path / "measurements.csv")
    log.info("where the time went: %s", time_split(result.timings))
    return 0


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="AP, F1, PQ of a model on an annotated split")
    p.add_argument("--data", default="../shared/data/dsb2018")
    p.add_argument("--split", required=True, help="split list, e.g. splits/fluo_test.txt")
    p.add_argument("--model", default="nuclei")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default=None,
                   choices=["auto", "fp32", "mixed", "bf16", "fp16", "int8"])
    _add_augment(p)
    p.add_argument("--csv", help="also write the table here")
    p.set_defaults(func=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    from cellmask.evaluate import evaluate_split, format_table

    model = _load(args)
    ev = evaluate_split(model, args.data, args.split)
    print(f"{args.split}: {ev.images} images, pooled over objects")
    print(format_table(ev))
    s = ev.summary()
    print(f"F1@0.5 {s['f1@0.50']:.3f}  AP@0.5 {s['ap@0.50']:.3f}  AP@0.75 {s['ap@0.75']:.3f}  "
          f"mean AP 0.5:0.95 {s['mean_ap']:.3f}")
    if args.csv:
        ev.table().to_csv(args.csv, index=False)
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="tune thresholds on a val split and write shippable weights")
    p.add_argument("weights", help="weights.safetensors of a training run")
    p.add_argument("--data", default="../shared/data/dsb2018")
    p.add_argument("--split", default="splits/val.txt", help="validation split (never test)")
    p.add_argument("--out", required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="fix an inference setting of the model configuration before tuning, "
                        "e.g. --set proposals_per_mpx=3072 (repeatable)")
    p.add_argument("--card", action="append", default=[], metavar="KEY=VALUE",
                   help="describe the model in its header: summary, modality, pixel_size_um, "
                        "trained_diameter, training_data, licence, accuracy (repeatable)")
    p.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from cellmask.train.export import export_model, parse_settings

    card = dict(item.partition("=")[::2] for item in args.card)
    path, best = export_model(args.weights, args.data, args.split, args.out,
                              settings=parse_settings(args.set), card=card)
    print(f"wrote {path}: {best}")
    return 0


def _add_calibrate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="measure the int8 activation ranges of a model on "
                       "training images and write the weights with them")
    p.add_argument("weights", help="a model name or weights.safetensors")
    p.add_argument("--data", default="../shared/data/dsb2018")
    p.add_argument("--split", default="splits/train.txt", help="a training split (never test)")
    p.add_argument("--images", type=int, default=32, help="images spread over the split")
    p.add_argument("--fpn", action="store_true",
                   help="quantise the FPN too (trunk and FPN as one int8 graph)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=_run_calibrate)


def _run_calibrate(args: argparse.Namespace) -> int:
    from cellmask.train.calibrate import calibrate_model

    path, record = calibrate_model(args.weights, args.data, args.split, args.out,
                                   images=args.images,
                                   trunk_part="backbone" if args.fpn else "trunk")
    print(f"wrote {path}: {record}")
    return 0


def _add_export_geojson(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export-geojson", help="write a cellmask output's objects as QuPath "
                       "GeoJSON (polygons with their measurements)")
    p.add_argument("output", help="a cellmask output (OME-Zarr store or its labels group)")
    p.add_argument("--name", default="cellmask", help="name of the labels image")
    p.add_argument("--out", help="GeoJSON file (default: beside the store, STORE.geojson)")
    p.add_argument("--class", dest="classification", default="Nucleus",
                   help="QuPath classification of the objects")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")
    p.set_defaults(func=_run_export_geojson)


def _run_export_geojson(args: argparse.Namespace) -> int:
    from cellmask.geojson import export_geojson

    path = export_geojson(args.output, args.out, name=args.name,
                          classification=args.classification, overwrite=args.overwrite)
    print(f"wrote {path}")
    return 0


def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the shipped models: modality, pixel size, data, "
                       "licence, accuracy")
    p.set_defaults(func=_run_models)


def _run_models(args: argparse.Namespace) -> int:
    from cellmask.model.registry import list_models

    for info in list_models():
        print(f"{info.name}: {info.summary}")
        for key in ("modality", "pixel_size", "training_data", "licence", "accuracy",
                    "int8_calibration"):
            print(f"    {key.replace('_', ' ')}: {getattr(info, key)}")
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="segment the shipped sample with the shipped model")
    p.add_argument("--out", default="demo_output")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from cellmask.demo import run_demo

    r = run_demo(args.out, device=args.device)
    print(f"cellmask demo: {r.objects} nuclei found in {r.seconds:.2f} s "
          f"(AP@0.5 {r.ap50:.3f} against the sample's annotation)")
    print(f"  labels:       {r.zarr}/labels/cellmask")
    print(f"  measurements: {r.csv}")
    print(f"  overlay:      {r.png}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cellmask", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bars, and only warnings and errors on stderr")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_segment, _add_evaluate, _add_train, _add_export, _add_calibrate,
                _add_export_geojson, _add_models, _add_demo):
        add(sub)
    return parser


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    """Run the command line; errors become one line on stderr and a non-zero exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.debug else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("cellmask: interrupted (run the same command again to resume)", file=sys.stderr)
        return 130
    except (CellmaskError, OSError) as err:  # bad input, missing files, refused runs, full disk
        if args.debug:
            raise
        print(f"cellmask: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except Exception as err:  # a defect of cellmask: still one line, the traceback on request
        if args.debug:
            raise
        print(f"cellmask: internal error: {type(err).__name__}: {_one_line(err)} (rerun with "
              "--debug for the traceback, and please report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
