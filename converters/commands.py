"""Command-line options and runners for ``edgemed train`` and ``edgemed convert``.

``edgemed/cli.py`` registers these. Only argparse and the standard library are imported at module level, so
``edgemed train --help`` prints at once; TensorFlow is imported when a command actually runs.
Exit codes: 0 ok, 2 usage or data error (raised as ConfigError/DataError), 3 the gate rejected a model.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from edgemed.errors import EXIT_MODEL, EXIT_OK, ConfigError

TRAIN_DESCRIPTION = (
    "Train an image classifier on your own labelled images and save it as NAME.keras with NAME.labels.json.\n"
    "Early stopping watches the validation split and keeps the best weights; the test split is never used."
)
TRAIN_EPILOG = """data layouts (--data):
  a MedMNIST-style .npz          train_images/train_labels (+ val_*, test_*, optional classes)
  a folder of class sub-folders  images/benign/*.png, images/malignant/*.jpg (split 70/15/15 here, seeded)
  a folder with labels.csv       columns file,label (label = index or class name)

recipes (--recipe; files in converters/recipes/*.yaml):
  reference    the reference CNN, layer for layer (baseline)
  bn_gap       CNN with BatchNorm, global average pooling, augmentation, balanced class weights
  bn_gap_auc   bn_gap stopped on validation ROC AUC, learning rate halved on plateaus
  bn_gap_auc_unweighted   bn_gap_auc without class weights
  mobilenetv2  MobileNetV2 alpha 0.35 from scratch, BN momentum 0.9, for 64-128 px colour images
  best         alias of the recipe the accuracy benchmark chose on validation (see benchmarks/results)

examples:
  edgemed train --data data/breastmnist_28.npz --out models --labels malignant,benign
  edgemed train --data isic_uda1_64.npz --out models --recipe mobilenetv2 --seed 1
  edgemed train --data photos/ --out models --image-size 64x64 --recipe best --epochs 20
"""

CONVERT_DESCRIPTION = (
    "Quantize a trained model for the device, check it against its float original on held-out images "
    "(the acceptance gate), and write DIR/NAME_TARGET.tflite, DIR/NAME.manifest.json, DIR/report.json and "
    "DIR/report.html.\nA model that fails the gate is moved to DIR/rejected/, marked rejected in the manifest "
    "(the device refuses it), and the command exits 3."
)
CONVERT_EPILOG = """targets (--target, several allowed):
  int8     full integer, int8 input and output (CPU, XNNPACK)          [default]
  uint8    full integer, uint8 input and output (what Coral examples expect)
  float16  float16 weights, float input and output (GPU delegates)
  dynamic  int8 weights, float activations
  edgetpu  the int8 model compiled by edgetpu_compiler when it is on PATH (Edge TPU check always runs)

gate defaults (change with flags or --gate-config FILE.yaml):
  accuracy drop <= 0.01, AUC drop <= 0.005, per-class sensitivity drop <= max(0.02, 1 case),
  top-1 agreement >= 0.98, ECE increase <= 0.03, >= 20 evaluation images per class

clinical floors (the converted model itself, per class; a faithful conversion of a weak model is still weak):
  sensitivity >= 0.50   below it the model misses more cases of the class than it finds (a coin flip finds half)
  ROC AUC >= 0.70       below it discrimination is poor by the common rule of thumb (0.7-0.8 acceptable)
  Fixed from these arguments, not tuned on any test split; no clinical validation. A model under a floor is
  accepted as "faithful conversion, clinically weak" with a WARNING per class; --require-floors rejects it.
  Per-class floors in the YAML: class_floors: {melanoma: {min_sensitivity: 0.9, min_auc: 0.85}}

examples:
  edgemed convert models/breast.keras --calibration data/breastmnist_28.npz --out dist
  edgemed convert models/breast.keras --calibration data/breastmnist_28.npz --out dist \\
      --target int8 uint8 float16 edgetpu --eval-split val --max-acc-drop 0.02
  edgemed convert models/skin.keras --calibration photos/ --out dist --gate-config gate.yaml
  edgemed convert models/skin.keras --calibration photos/ --out dist \\
      --waive-gate --waiver-by "Dr A. Example" --waiver-reason "validated on site study 12"

the data must be the model's (else exit 2, before any work): the classes it was trained on (NAME.labels.json),
as many classes as it has outputs, its image size and colour mode (a .npz stored otherwise is refused unless
converted on purpose with --image-size/--colour-mode), and colour images for a model trained on colour

out-of-distribution check (on by default, --ood auto): the device flags a frame unlike the training images
(another modality, the wrong body part or preset) as inconclusive instead of answering. Its statistics are
fitted on the train split and each threshold on the val split (the data needs one; never the test split) so
that --ood-fraction (3%) of in-distribution validation images are flagged. Try it on images of other kinds:
  edgemed convert models/breast.keras --calibration data/breastmnist_28.npz --out dist \\
      --ood-eval data/isic_samples other.npz
The report's "Out-of-distribution" section shows histograms, AUROC and FPR at 95% TPR per score and set.

exit codes: 0 every model accepted (or waived), 2 usage or data error, 3 the gate rejected a model
"""


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: use HEIGHTxWIDTH, e.g. 64x64") from exc
    return h, w


def _labels(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if len(names) < 2:
        raise argparse.ArgumentTypeError(f"{text!r}: give at least two comma-separated names, e.g. benign,malignant")
    return names


def _add_data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--labels",
        type=_labels,
        metavar="A,B,...",
        help="class names in label order, e.g. --labels malignant,benign (default: from the data)",
    )
    p.add_argument(
        "--image-size",
        type=_size,
        metavar="HxW",
        help="resize images to this size, e.g. --image-size 64x64 (default: the file's own size; "
        "64x64 for image folders)",
    )
    p.add_argument(
        "--colour-mode",
        choices=["gray", "rgb"],
        help="convert images to gray or rgb, e.g. --colour-mode gray (default: as stored; rgb for folders)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars or per-epoch lines (for logs)")


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """Register ``edgemed train`` options on ``p``."""
    p.add_argument(
        "--data",
        type=Path,
        required=True,
        metavar="FILE",
        help="labelled images: .npz, class folders or labels.csv folder, e.g. --data data/breastmnist_28.npz",
    )
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder, e.g. --out models")
    p.add_argument(
        "--recipe",
        default="reference",
        metavar="NAME",
        help="training recipe name or .yaml path, e.g. --recipe best (default reference)",
    )
    p.add_argument("--seed", type=int, default=0, metavar="N", help="random seed, e.g. --seed 1 (default 0)")
    p.add_argument(
        "--epochs",
        type=int,
        metavar="N",
        help="maximum epochs, overriding the recipe's, e.g. --epochs 10 (early stopping may end sooner)",
    )
    p.add_argument("--name", metavar="NAME", help="file stem for NAME.keras, e.g. --name breast (default DATA_RECIPE)")
    _add_data_options(p)


def run_train(args: argparse.Namespace) -> int:
    """Run ``edgemed train``; returns the exit code."""
    from converters._tf import quiet_tensorflow
    from converters.data import load_dataset

    quiet_tensorflow()  # before converters.train imports Keras (and with it TensorFlow)
    from converters.train import train

    ds = load_dataset(args.data, labels=args.labels, image_size=args.image_size, colour_mode=args.colour_mode)
    sizes = ", ".join(f"{k} {len(v[1])}" for k, v in ds.splits.items())
    print(f"data: {ds.source}: {sizes}; labels {', '.join(ds.labels)}; images {ds.image_shape}")
    result = train(
        ds,
        args.out,
        recipe=args.recipe,
        seed=args.seed,
        epochs=args.epochs,
        progress=not args.no_progress,
        name=args.name,
    )
    print(
        f"saved {result.model_path} (recipe {result.recipe}, {result.epochs_run} epochs, best epoch "
        f"{result.best_epoch}: validation loss {result.val_loss:.4f}, accuracy {result.val_accuracy:.4f})"
    )
    print(f"next: edgemed convert {result.model_path} --calibration {args.data} --out DIR")
    return EXIT_OK


def add_convert_arguments(p: argparse.ArgumentParser) -> None:
    """Register ``edgemed convert`` options on ``p``."""
    p.add_argument(
        "model",
        type=Path,
        metavar="MODEL",
        help="trained model: .keras, .h5 or SavedModel folder, e.g. models/breast.keras",
    )
    p.add_argument(
        "--calibration",
        type=Path,
        required=True,
        metavar="FILE",
        help="your labelled images (same layouts as train); its train split calibrates, its test "
        "(else val) split is the gate's evaluation set, e.g. --calibration data/breastmnist_28.npz",
    )
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder, e.g. --out dist")
    p.add_argument(
        "--target",
        nargs="+",
        default=["int8"],
        metavar="TARGET",
        help="one or more of int8 uint8 float16 dynamic edgetpu, e.g. --target int8 float16 (default int8)",
    )
    p.add_argument(
        "--eval-split",
        choices=["test", "val"],
        help="held-out split the gate uses, e.g. --eval-split val (default test if present, else val)",
    )
    p.add_argument("--name", metavar="NAME", help="file stem, e.g. --name breast (default: the model file's stem)")
    p.add_argument(
        "--output",
        choices=["logits", "probabilities"],
        default="logits",
        help="what the quantized model outputs; logits keeps the ranking (AUC), the device applies the "
        "softmax (default logits)",
    )
    g = p.add_argument_group("acceptance gate (defaults are safe; see the list below)")
    g.add_argument(
        "--gate-config",
        type=Path,
        metavar="FILE",
        help="YAML or JSON with gate thresholds, e.g. --gate-config gate.yaml containing 'max_accuracy_drop: 0.02'",
    )
    g.add_argument("--max-acc-drop", type=float, metavar="X", help="largest accuracy loss, e.g. 0.01")
    g.add_argument("--max-auc-drop", type=float, metavar="X", help="largest ROC AUC loss, e.g. 0.005")
    g.add_argument(
        "--max-sens-drop",
        type=float,
        metavar="X",
        help="largest per-class sensitivity loss (or 1 case, whichever is larger), e.g. 0.02",
    )
    g.add_argument("--min-agreement", type=float, metavar="X", help="smallest top-1 agreement with float, e.g. 0.98")
    g.add_argument("--max-ece-increase", type=float, metavar="X", help="largest calibration-error rise, e.g. 0.03")
    g.add_argument("--min-eval-per-class", type=int, metavar="N", help="fewest evaluation images per class, e.g. 20")
    g.add_argument("--max-size-kb", type=float, metavar="KB", help="largest model file, e.g. 512")
    g.add_argument("--max-latency-ms", type=float, metavar="MS", help="largest median CPU latency, e.g. 5")
    g.add_argument(
        "--min-sensitivity",
        type=float,
        metavar="X",
        help="clinical floor for every class's sensitivity, e.g. 0.8 (default 0.50)",
    )
    g.add_argument(
        "--min-auc", type=float, metavar="X", help="clinical floor for every class's ROC AUC, e.g. 0.8 (default 0.70)"
    )
    g.add_argument(
        "--require-floors",
        action="store_true",
        help="reject a model under a clinical floor (default: accept it as clinically weak, with a warning)",
    )
    g.add_argument(
        "--waive-gate",
        action="store_true",
        help="ship a model the gate rejects, recording who and why in the manifest (needs both below)",
    )
    g.add_argument("--waiver-by", metavar="NAME", help='who takes responsibility, e.g. --waiver-by "Dr A. Example"')
    g.add_argument(
        "--waiver-reason", metavar="TEXT", help='why, e.g. --waiver-reason "validated on the site study, report 12"'
    )
    o = p.add_argument_group(
        "out-of-distribution abstention (the device flags frames unlike the training images as inconclusive)"
    )
    o.add_argument(
        "--ood",
        choices=["auto", "energy", "features", "none"],
        default="auto",
        help="auto (default): the feature score (distance of several layers' pooled activations to the training "
        "classes; the model gets one extra output per layer) when the model has layers to read, else energy; "
        "energy: from the logits only, no extra outputs; features: the feature score or an error; none: no check, "
        "no extra outputs. Fitted on the train split, thresholded on the val split (needs one), e.g. --ood energy",
    )
    o.add_argument(
        "--ood-eval",
        nargs="+",
        type=Path,
        default=[],
        metavar="FILE",
        help="images of other kinds to test the check on, in the report only (AUROC, FPR at 95%% TPR, fraction "
        "flagged): a .npz (its test split) or anything `edgemed run` reads, e.g. --ood-eval data/isic_samples",
    )
    o.add_argument(
        "--ood-fraction",
        type=float,
        default=0.03,
        metavar="X",
        help="share of in-distribution validation images each threshold flags, e.g. 0.05 (default 0.03); "
        "a profile can override the threshold on the device",
    )
    p.add_argument(
        "--cam",
        choices=["auto", "none"],
        default="auto",
        help="auto (default): a model ending in GlobalAveragePooling2D + Dense also outputs its last feature map, "
        "and the manifest gets the Dense weights, so the device's screen can show a class activation map (a model "
        "without that head gets a note: the screen offers occlusion instead); none: no extra output, e.g. --cam none",
    )
    c = p.add_argument_group("calibration")
    c.add_argument(
        "--calibration-per-class",
        type=int,
        default=100,
        metavar="N",
        help="training images per class used to calibrate, e.g. 100 (default 100)",
    )
    c.add_argument(
        "--min-calibration-per-class",
        type=int,
        default=10,
        metavar="N",
        help="refuse when any class has fewer training images, e.g. 10 (default 10)",
    )
    c.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the calibration draw (default 0)")
    _add_data_options(p)


def run_convert(args: argparse.Namespace) -> int:
    """Run ``edgemed convert``; returns 0, or 3 when the gate rejected a model."""
    from converters._tf import quiet_tensorflow
    from converters.convert import TARGETS  # imports no TensorFlow: that happens in quiet_tensorflow below
    from converters.data import load_dataset
    from converters.fit import expectation, fit_to_model, read_training_record
    from converters.gate import load_gate_config

    targets = [t for value in args.target for t in value.split(",") if t]
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise ConfigError(f"unknown --target {', '.join(unknown)}; choose from {', '.join(TARGETS)}")
    waiver = _waiver(args)
    gate = load_gate_config(
        args.gate_config,
        max_accuracy_drop=args.max_acc_drop,
        max_auc_drop=args.max_auc_drop,
        max_sensitivity_drop=args.max_sens_drop,
        min_agreement=args.min_agreement,
        max_ece_increase=args.max_ece_increase,
        min_eval_per_class=args.min_eval_per_class,
        max_size_bytes=int(args.max_size_kb * 1024) if args.max_size_kb else None,
        max_latency_ms=args.max_latency_ms,
        min_sensitivity=args.min_sensitivity,
        min_auc=args.min_auc,
        require_floors=True if args.require_floors else None,
    )
    record = read_training_record(args.model)
    exp = expectation(args.model, record)
    if args.labels and exp.labels and args.labels != exp.labels:
        raise ConfigError(
            f"--labels {','.join(args.labels)} differs from the classes {args.model.name} was trained on "
            f"({', '.join(exp.labels)} in {exp.record}); leave --labels out"
        )
    # The training-time image geometry, unless the user overrides it; the data's own class names are kept
    # (labels=None) so that fit_to_model can compare them with the model's instead of overwriting them.
    size = args.image_size or (exp.shape[:2] if exp.shape else None)
    mode = args.colour_mode or (record or {}).get("colour_mode")
    ds = load_dataset(args.calibration, labels=None if exp.labels else args.labels, image_size=size, colour_mode=mode)
    # Refused here, before TensorFlow is even imported, when the data is plainly not this model's.
    ds = fit_to_model(
        ds, exp, "calibration", resized_on_purpose=bool(args.image_size or args.colour_mode), eval_split=args.eval_split
    )

    quiet_tensorflow()  # before convert() loads the model with Keras
    from converters.convert import convert
    from converters.report import summary_lines
    from edgemed.manifest import load_manifest

    result = convert(
        args.model,
        ds,
        args.out,
        targets=targets,
        name=args.name,
        eval_split=args.eval_split,
        gate=gate,
        waiver=waiver,
        output=args.output,
        calibration_per_class=args.calibration_per_class,
        min_calibration_per_class=args.min_calibration_per_class,
        seed=args.seed,
        progress=not args.no_progress,
        ood=args.ood,
        ood_eval=args.ood_eval,
        ood_fraction=args.ood_fraction,
        cam=args.cam,
    )
    manifest = load_manifest(result.manifest_path)
    print("\n".join(summary_lines(manifest, result.float_summary, result.gates)))
    main_ood = next((o for o in result.ood if o.target == "int8"), result.ood[0] if result.ood else None)
    if main_ood is not None:
        print(main_ood.summary_line())
    for note in result.notes:
        print(f"note: {note}")
    weak = [t for t, w in result.weak.items() if w and result.verdicts.get(t) != "rejected"]
    if weak:
        what = "is a faithful conversion" if len(weak) == 1 else "are faithful conversions"
        print(
            f"CLINICALLY WEAK: {', '.join(weak)} {what} of a model under a clinical floor (WARNING lines above); "
            "set the floors your clinical use needs with --gate-config, or refuse such a model with --require-floors."
        )
    print(f"manifest {result.manifest_path}\nreport   {result.report_html}")
    if result.rejected:
        print(
            "REJECTED: the acceptance gate failed (see above); rejected files are in "
            f"{Path(args.out) / 'rejected'}. Fix the conversion or record a waiver with --waive-gate."
        )
        return EXIT_MODEL
    return EXIT_OK


def _waiver(args: argparse.Namespace) -> tuple[str, str] | None:
    if args.waive_gate:
        if not args.waiver_by or not args.waiver_reason:
            raise ConfigError(
                "--waive-gate needs --waiver-by NAME and --waiver-reason TEXT: a waiver names a "
                "responsible person and a reason"
            )
        return args.waiver_by, args.waiver_reason
    if args.waiver_by or args.waiver_reason:
        raise ConfigError("--waiver-by/--waiver-reason only apply with --waive-gate")
    return None
