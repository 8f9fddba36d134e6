"""Out-of-distribution benchmark: does the int8 model on the device say "not my kind of image" when it should?

For BreastMNIST (breast ultrasound) and PneumoniaMNIST (chest X-ray) models, reference and ``best`` recipes,
seeds 0 1 2, each model is converted to int8 with ``edgemed convert``'s default ``--ood auto`` (feature
statistics fitted on the training split, thresholds chosen on the validation split so that 3% of it is
flagged), then run through the device's code (``converters.runner.DeviceModel``: the device's backend and
preprocessing; scores from ``edgemed.ood``, checked against ``OodDetector.check`` frame by frame) on

* the in-distribution **test** split (read once, here, after every choice was made on validation data), and
* OOD sets from ``$EDGEMED_DATA`` (default ``../shared/data``): the other MedMNIST test split, the ISIC
  dermoscopy test split and the 12 full-size ISIC photographs (other modalities), every frame of the
  ultrasound DICOM files (same modality as BreastMNIST from other scanners: *near* distribution for that model,
  another modality for the X-ray model), and blank and noise frames (see ``benchmarks/_ood_sets.py``).

For three scores side by side (max-softmax, the Hendrycks & Gimpel baseline; energy on the logits; the feature
score the manifest ships as default) it reports AUROC (OOD = positive) and FPR at 95% TPR (the literature's
convention: the share of OOD frames still accepted at the score that accepts 95% of the in-distribution test
frames), the fraction of each set flagged at the method's shipped threshold (max-softmax has none: its threshold is
chosen the same way, on the validation split), and the fraction of the ID test split flagged. Medians over seeds,
and every seed's numbers, go to ``benchmarks/results/ood.json`` and ``ood.md``; the targets of issue 14 are checked
at the end (other modality: AUROC >= 0.99 and >= 95% flagged; <= 5% of ID test flagged; the default beats
max-softmax on every other-modality set). The per-frame cost (``--cost-only`` for just that): invoke time of the
reference int8 model with and without the feature outputs (``--ood none``), what the OOD check adds to the device's
``Classifier`` per method, and that as a share of the invoke and of the device's whole ``Device.process`` time.

Trained Keras models are cached (``benchmarks/_ood_models.py``, default ``/work/bench-cache/ood``); a missing
one is trained first. Examples:

    nice python benchmarks/bench_ood.py                    # the full run: 12 models, results committed
    python benchmarks/bench_ood.py --quick                 # 1 seed, 2 epochs: a smoke run into a temp dir
    python benchmarks/bench_ood.py --datasets breastmnist --recipes reference --seeds 0 --out /tmp/ood
    python benchmarks/bench_ood.py --cost-only             # only the per-frame cost table (temp dir)

Uses TensorFlow for the conversions; ``--threads`` limits it (default 1, the machine may be shared).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("KERAS_HOME", tempfile.mkdtemp(prefix="edgemed-bench-keras-"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import _ood_models as models  # noqa: E402
import _ood_report as report  # noqa: E402
from _ood_sets import OodSet, file_sets, synthetic_sets  # noqa: E402

METHODS = ("max_softmax", "energy", "features")
PARITY_FRAMES = 4  # frames per set re-scored one at a time by OodDetector.check, as the device does
RESULTS = ROOT / "benchmarks" / "results"
TIMING_ROUNDS = 21  # timing rounds (invokes alternate between the two models); the fastest is kept

_converted: dict[tuple[str, str], tuple[Path, Any, Any, str]] = {}


@dataclass
class Scored:
    """One model's scores per method on one set of frames (higher: less like the training images)."""

    scores: dict[str, np.ndarray]
    probs: np.ndarray


def score_frames(model: Any, artifact: Any, images: Any) -> Scored:
    """Run frames through the device's backend and preprocessing; every method's score for every frame.

    The scores are the report's (``converters.ood.method_scores``: ``edgemed.ood``'s arithmetic on the dequantized
    outputs); :func:`parity` checks them against the device's per-frame ``OodDetector.check``.
    """
    from converters.ood import method_scores

    out = model.run(images, artifact.output_kind)
    return Scored(method_scores(artifact.ood, out), out.probs)


def detectors(model: Any, artifact: Any) -> dict[str, Any]:
    """The device's per-frame OOD check for each method this artifact ships."""
    from edgemed.ood import OodDetector, OodSetting

    specs = {s.name: s for s in model.backend.output_specs}
    found = {}
    for method in ("energy", "features"):
        if artifact.ood.method(method) is not None:
            det = OodDetector.build(artifact, model.backend.output_spec, specs, OodSetting(method=method))
            found[method] = det
    return found


def parity(model: Any, dets: dict[str, Any], images: Any, batch: Scored) -> dict[str, float]:
    """Largest |per-frame check score - batch score| over the first frames: the two paths must agree."""
    worst = dict.fromkeys(dets, 0.0)
    for i, image in enumerate(list(images)[:PARITY_FRAMES]):
        raw = model.backend.invoke(model.preprocess(image))
        for method, det in dets.items():
            check = det.check(raw, model.backend.output)
            worst[method] = max(worst[method], abs(float(check.score) - float(batch.scores[method][i])))
    return worst


def _best_ms(fn: Any, rounds: int = 15, calls: int = 200) -> float:
    """The fastest round's mean wall time of ``fn()`` in milliseconds: a round of many calls, so the clock's own
    cost is spread thin, and the fastest of several, as other work on a shared machine only ever adds time."""
    fn()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1000.0


def check_costs_ms(model: Any, artifact: Any, manifest: Any, images: Any) -> dict[str, float]:
    """What the OOD check adds per frame on the device's ``Classifier``, per method, in milliseconds.

    The device calls ``check_ood`` then ``scores`` on each frame's raw row. The energy at T = 1 shares the
    softmax's pass over the logits, so its cost is the time of both minus ``scores`` alone (no OOD); the feature
    check reads the feature outputs and scores them (``check_ood`` alone). Two frames' rows alternate, so no call
    is answered from the one row the Classifier keeps.
    """
    from edgemed.inference.classify import Classifier
    from edgemed.ood import OodSetting

    backend = model.backend
    rows = [backend.invoke(model.preprocess(image)) for image in images[:2]]
    plain = Classifier(backend, manifest, artifact, ood=OodSetting(method="none"))
    flip = [0]

    def frame(c: Any, ood: bool) -> None:
        flip[0] ^= 1
        raw = rows[flip[0]]
        if ood:
            c.check_ood(raw)
        c.scores(raw)

    costs = {}
    scores_ms = _best_ms(lambda: frame(plain, False))
    for method in ("energy", "features"):
        if artifact.ood.method(method) is None:
            continue
        c = Classifier(backend, manifest, artifact, ood=OodSetting(method=method))
        if method == "features":
            backend.invoke(model.preprocess(images[0]))  # the feature outputs read are this frame's
            raw = rows[0]
            costs[method] = _best_ms(lambda c=c, raw=raw: c.check_ood(raw))
        else:
            costs[method] = max(_best_ms(lambda c=c: frame(c, True)) - scores_ms, 0.0)
    costs["scores"] = scores_ms
    return costs


def process_ms(model_path: Path, images: Any, work: Path) -> float:
    """The device's whole time per frame: ``Device.process`` (quality gate, preprocess, invoke, OOD check,
    triage, envelope, outbox commit) on the same model, offline, one inference thread; fastest round's mean."""
    from edgemed.config import DeviceProfile
    from edgemed.runtime import Device
    from edgemed.types import Frame

    data_dir = Path(tempfile.mkdtemp(prefix="process-", dir=work))
    profile = DeviceProfile.model_validate({
        "profile": "bench-ood-cost",
        "device": {"id": "bench-01", "site": "bench", "data_dir": str(data_dir)},
        "model": {"path": str(model_path)},
        "inference": {"threads": 1},
        "run": {"print_results": False},
    })  # fmt: skip
    frames = [Frame(index=i, source_kind="folder", image=np.asarray(img)) for i, img in enumerate(images[:50])]
    position = [0]
    with Device(profile) as device:

        def one() -> None:
            position[0] += 1
            device.process(frames[position[0] % len(frames)])

        return _best_ms(one, rounds=TIMING_ROUNDS, calls=100)


def set_metrics(id_test: Scored, ood: Scored, thresholds: dict[str, float]) -> dict[str, dict[str, float]]:
    """AUROC, FPR at 95% TPR and fraction flagged per method for one OOD set against the ID test split."""
    from converters.ood import auroc_fpr95

    rows = {}
    for method, out_scores in ood.scores.items():
        auroc, fpr95 = auroc_fpr95(id_test.scores[method], out_scores)
        rows[method] = {
            "auroc": float(auroc),
            "fpr95": float(fpr95),
            "flagged": float(np.mean(out_scores > thresholds[method])),
        }
    return rows


def convert_model(cached: models.CachedModel, ds: Any, work: Path, ood: str) -> tuple[Path, Any, Any, str]:
    """``edgemed convert`` to int8 with ``--ood OOD`` (once per model and method in a run); the gate judges on
    val, so the test split stays unread. A file the gate rejects is measured all the same (its verdict is
    recorded): the OOD statistics are fitted the same way, and the question here is what they catch."""
    from converters.convert import convert
    from edgemed.manifest import load_manifest

    key = (str(cached.model_path), ood)
    if key in _converted:
        return _converted[key]
    out = work / f"{cached.dataset}_{cached.recipe}_s{cached.seed}_{ood}"
    res = convert(
        cached.model_path, ds, out, targets=("int8",), name="model", eval_split="val", progress=False,
        seed=cached.seed, ood=ood,
    )  # fmt: skip
    manifest = load_manifest(res.manifest_path)
    artifact = next(a for a in manifest.artifacts if a.target == "int8")
    verdict = res.verdicts["int8"] + (f" ({'; '.join(res.failed['int8'])})" if res.failed["int8"] else "")
    _converted[key] = res.artifacts["int8"], manifest, artifact, verdict
    return _converted[key]


def measure(cached: models.CachedModel, ds: Any, sets: list[OodSet], work: Path) -> dict[str, Any]:
    """Convert one trained model and measure every method on the ID test split and every OOD set."""
    from converters.runner import DeviceModel

    path, manifest, artifact, verdict = convert_model(cached, ds, work, "auto")
    if artifact.ood is None:
        raise SystemExit(f"{path}: the conversion wrote no ood section; the benchmark needs --ood auto to fit one")
    x_val, _ = ds.splits["val"]
    x_test, y_test = ds.splits["test"]
    with DeviceModel(path, manifest.input, artifact.outputs) as model:
        val = score_frames(model, artifact, x_val)
        thresholds, recheck = report.thresholds(artifact.ood, val.scores)
        test = score_frames(model, artifact, x_test)  # the one read of the test split for this model
        dets = detectors(model, artifact)
        worst = parity(model, dets, x_test, test)
        per_set = {}
        for s in sets:
            scored = score_frames(model, artifact, s.images)
            for method, diff in parity(model, dets, s.images, scored).items():
                worst[method] = max(worst[method], diff)
            per_set[s.name] = {"kind": s.kind, "n": len(s.images), "methods": set_metrics(test, scored, thresholds)}
    return {
        "dataset": cached.dataset,
        "recipe": cached.recipe,
        "resolved_recipe": cached.info["resolved_recipe"],
        "seed": cached.seed,
        "verdict": verdict,
        "default": artifact.ood.default,
        "test_acc": float(np.mean(test.probs.argmax(axis=1) == y_test)),
        "n_val": len(x_val),
        "n_test": len(x_test),
        "thresholds": thresholds,
        "shipped_minus_val_quantile": recheck,
        "val_flagged_shipped": report.shipped_val_fractions(artifact.ood),
        "feature_rank_agreement": artifact.ood.feature_rank_agreement,
        "feature_layers": [layer.layer for layer in artifact.ood.features.layers] if artifact.ood.features else [],
        "id_test_flagged": {m: float(np.mean(test.scores[m] > thresholds[m])) for m in test.scores},
        "parity_max_abs": worst,
        "sets": per_set,
    }


def frame_cost(cached: models.CachedModel, ds: Any, work: Path) -> dict[str, float | None]:
    """Per-frame cost of the OOD check on one reference model: invoke with/without taps, the check per method,
    and its share of the invoke without taps and of the device's whole per-frame time (``Device.process``)."""
    from converters.runner import DeviceModel

    images = ds.splits["val"][0]
    image = images[0]
    plain_path, plain_manifest, plain_art, _ = convert_model(cached, ds, work, "none")
    path, manifest, artifact, _ = convert_model(cached, ds, work, "auto")
    with (
        DeviceModel(plain_path, plain_manifest.input, plain_art.outputs) as plain,
        DeviceModel(path, manifest.input, artifact.outputs) as model,
    ):
        x_plain, x_model = plain.preprocess(image), model.preprocess(image)
        # Alternating between the two models, so a busy machine slows both alike.
        rounds = [
            (_best_ms(lambda: plain.backend.invoke(x_plain), 1), _best_ms(lambda: model.backend.invoke(x_model), 1))
            for _ in range(TIMING_ROUNDS)
        ]
        plain_ms = min(r[0] for r in rounds)
        taps_ms = min(r[1] for r in rounds)
        checks = check_costs_ms(model, artifact, manifest, images)
    frame_ms = process_ms(path, images, work)
    cost: dict[str, float | None] = {
        "invoke_no_taps_ms": plain_ms,
        "invoke_with_taps_ms": taps_ms,
        "scores_ms": checks.pop("scores"),
        "process_ms": frame_ms,
    }
    cost.update({f"check_{m}_ms": v for m, v in checks.items()})
    for m in ("energy", "features"):
        extra = checks.get(m)
        if extra is not None and m == "features":
            # The feature score costs its check plus the extra outputs the graph computes for it.
            extra += max(taps_ms - plain_ms, 0.0)
        cost[f"{m}_ratio"] = None if extra is None else extra / plain_ms
        cost[f"{m}_frame_ratio"] = None if extra is None else extra / frame_ms
    return cost


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from converters.data import load_dataset

    data = models.data_dir()
    runs: list[dict[str, Any]] = []
    costs: dict[str, dict[str, float | None]] = {}
    legends: dict[str, dict[str, Any]] = {}
    for dataset in args.datasets:
        ds = load_dataset(data / f"{dataset}_28.npz", labels=models.LABELS[dataset])
        height, width = ds.image_shape[:2]
        sets = file_sets(dataset, data) + synthetic_sets(height, width)
        for recipe in args.recipes if not args.cost_only else ():
            for seed in args.seeds:
                cached = models.get_model(args.cache, dataset, recipe, seed, args.max_epochs)
                start = time.perf_counter()
                row = measure(cached, ds, sets, work)
                row["seconds"] = round(time.perf_counter() - start, 1)
                runs.append(row)
                print(report.run_line(row), flush=True)
        if "reference" in args.recipes:
            cached = models.get_model(args.cache, dataset, "reference", args.seeds[0], args.max_epochs)
            costs[dataset] = frame_cost(cached, ds, work)
            print(f"{dataset} reference s{args.seeds[0]} cost: {report.cost_line(costs[dataset])}", flush=True)
        legends[dataset] = {s.name: {"kind": s.kind, "what": s.what, "n": len(s.images)} for s in sets}
    return {"runs": runs, "medians": report.medians(runs), "cost": costs, "sets": legends}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=list(models.DATASETS), choices=models.DATASETS)
    p.add_argument("--recipes", nargs="+", default=list(models.RECIPES), help="reference and/or best (default both)")
    p.add_argument("--seeds", nargs="+", type=int, default=list(models.SEEDS), help="training seeds (default 0 1 2)")
    p.add_argument("--max-epochs", type=int, help="cap training epochs (such models are cached separately)")
    p.add_argument("--quick", action="store_true", help="smoke run: seed 0 only, 2 epochs, results to a temp dir")
    p.add_argument("--threads", type=int, default=1, help="TensorFlow threads (default 1)")
    p.add_argument("--cache", type=Path, default=models.DEFAULT_CACHE, help="trained-model cache folder")
    p.add_argument("--out", type=Path, help=f"results folder (default {RESULTS}; a temp dir with --quick)")
    p.add_argument(
        "--cost-only",
        action="store_true",
        help="only the per-frame cost (reference model, first seed: invoke, OOD checks, Device.process), printed "
        "and written to ood_cost.json in a temp dir (or --out); no OOD sets, the committed tables stay",
    )
    args = p.parse_args(argv)
    if args.cost_only:
        if "reference" not in args.recipes:
            p.error("--cost-only measures the reference recipe: leave --recipes at its default or include reference")
        if args.out is not None and args.out.resolve() == RESULTS.resolve():
            p.error(f"--cost-only must not overwrite the committed results in {RESULTS}; give another --out")
        args.out = args.out or Path(tempfile.mkdtemp(prefix="edgemed-ood-cost-"))
    if args.quick:
        args.seeds, args.max_epochs = args.seeds[:1], args.max_epochs or 2
        if args.out is not None and args.out.resolve() == RESULTS.resolve():
            p.error(f"--quick must not overwrite the committed results in {RESULTS}; give another --out")
        args.out = args.out or Path(tempfile.mkdtemp(prefix="edgemed-ood-quick-"))
    args.out = args.out or RESULTS
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    models.set_threads(args.threads)
    import tensorflow as tf

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edgemed-bench-ood-") as work:
        results = run(args, Path(work))
    if args.cost_only:
        args.out.mkdir(parents=True, exist_ok=True)
        doc = {"meta": {"seed": args.seeds[0], "max_epochs": args.max_epochs, "python": platform.python_version(),
                        "load_average_at_end": list(os.getloadavg())}, "cost": results["cost"]}  # fmt: skip
        (args.out / "ood_cost.json").write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")
        print("\n".join(report.cost_markdown(results["cost"])))
        print(f"results in {args.out}")
        return 0
    checks = report.targets(results["medians"], results["cost"])
    meta = {
        "datasets": args.datasets,
        "recipes": args.recipes,
        "seeds": args.seeds,
        "max_epochs": args.max_epochs,
        "quick": args.quick,
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "load_average_at_end": list(os.getloadavg()),
        "minutes": round((time.perf_counter() - start) / 60, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {"meta": meta, **results, "targets": checks}
    (args.out / "ood.json").write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")
    table = report.markdown(doc)
    (args.out / "ood.md").write_text(table)
    print(table)
    print(report.targets_text(checks))
    print(f"results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
