"""Accuracy benchmark: float vs int8 on BreastMNIST and PneumoniaMNIST, next to MedMNIST v2's ResNet-18.

Protocol (so the test split cannot leak into any choice):

1. For each dataset, train every candidate recipe with several seeds; early stopping uses the validation split.
2. Choose the best recipe per dataset by its median *validation* ROC AUC (float model). The test split is not
   read for this.
3. Convert the reference CNN and the chosen recipe's models to int8 (logits output, calibrated on training
   images) and evaluate them on the test split, once per final choice, float and int8 side by side.
4. Report medians over seeds (and every seed's numbers) in ``benchmarks/results/accuracy.json`` and
   ``accuracy.md``. For the reference CNN it also converts with an int8 *softmax* output, to measure what the
   converter's default (logits) saves.

Data come from ``$EDGEMED_DATA`` (default ``../shared/data`` relative to the repository root). Run:

    nice python benchmarks/bench_accuracy.py --seeds 0 1 2

Uses TensorFlow; limit it to the cores you can spare with ``--threads``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("KERAS_HOME", tempfile.mkdtemp(prefix="edgemed-bench-keras-"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

#: MedMNIST v2 (Yang et al., Sci Data 2023), ResNet-18 at 28x28, test split.
PUBLISHED = {"breastmnist": {"acc": 0.863, "auc": 0.901}, "pneumoniamnist": {"acc": 0.854, "auc": 0.944}}
LABELS = {"breastmnist": ["malignant", "benign"], "pneumoniamnist": ["normal", "pneumonia"]}


def data_dir() -> Path:
    return Path(os.environ.get("EDGEMED_DATA", ROOT.parent / "shared" / "data"))


def run(
    datasets: list[str], recipes: list[str], seeds: list[int], max_epochs: int | None, work: Path
) -> dict[str, Any]:
    import keras
    import numpy as np

    from converters.convert import convert
    from converters.data import load_dataset
    from converters.metrics import summarise
    from converters.train import train

    results: dict[str, Any] = {}
    for name in datasets:
        ds = load_dataset(data_dir() / f"{name}_28.npz", labels=LABELS[name])
        x_val, y_val = ds.splits["val"]
        runs: dict[str, list[dict[str, Any]]] = {}
        for recipe in recipes:
            for seed in seeds:
                start = time.perf_counter()
                tr = train(
                    ds,
                    work / name,
                    recipe=recipe,
                    seed=seed,
                    epochs=max_epochs,
                    progress=False,
                    name=f"{name}_{recipe}_s{seed}",
                )
                model = keras.models.load_model(tr.model_path, compile=False)
                val_probs = model.predict(x_val.astype(np.float32) / 255.0, verbose=0)
                val = summarise(y_val, val_probs.astype(np.float64), ds.labels)
                runs.setdefault(recipe, []).append(
                    {
                        "seed": seed,
                        "model": str(tr.model_path),
                        "epochs": tr.epochs_run,
                        "best_epoch": tr.best_epoch,
                        "val_acc": val.accuracy,
                        "val_auc": val.roc_auc,
                        "train_s": round(time.perf_counter() - start, 1),
                    }
                )
                print(
                    f"{name} {recipe} seed {seed}: val acc {val.accuracy:.3f} auc {val.roc_auc:.3f} "
                    f"({tr.epochs_run} epochs, {time.perf_counter() - start:.0f} s)",
                    flush=True,
                )
        choice = max(recipes, key=lambda r: statistics.median(v["val_auc"] for v in runs[r]))
        finals = list(dict.fromkeys(["reference", choice])) if "reference" in recipes else [choice]
        tested: dict[str, Any] = {}
        for recipe in finals:
            rows = []
            for r in runs[recipe]:
                res = convert(
                    r["model"],
                    ds,
                    work / name / f"{recipe}_s{r['seed']}",
                    targets=("int8",),
                    eval_split="test",
                    progress=False,
                    seed=r["seed"],
                )
                g = res.gates["int8"]
                row = {
                    **r,
                    "test_float_acc": res.float_summary.accuracy,
                    "test_float_auc": res.float_summary.roc_auc,
                    "test_int8_acc": g.quantized.accuracy,
                    "test_int8_auc": g.quantized.roc_auc,
                    "agreement": g.agreement,
                    "verdict": res.verdicts["int8"],
                    "failed": res.failed["int8"],
                }
                if recipe == "reference":
                    soft = convert(
                        r["model"],
                        ds,
                        work / name / f"{recipe}_s{r['seed']}_softmax",
                        targets=("int8",),
                        eval_split="test",
                        output="probabilities",
                        progress=False,
                        seed=r["seed"],
                    )
                    row["test_int8_softmax_auc"] = soft.gates["int8"].quantized.roc_auc
                    row["test_int8_softmax_agreement"] = soft.gates["int8"].agreement
                rows.append(row)
                print(
                    f"{name} {recipe} seed {r['seed']} TEST: float {row['test_float_acc']:.3f}/"
                    f"{row['test_float_auc']:.3f} int8 {row['test_int8_acc']:.3f}/{row['test_int8_auc']:.3f} "
                    f"agreement {row['agreement']:.3f} {row['verdict']}",
                    flush=True,
                )
            keys = [k for k in rows[0] if k.startswith("test_") or k == "agreement"]
            tested[recipe] = {"runs": rows, "median": {k: statistics.median(r[k] for r in rows) for k in keys}}
        results[name] = {
            "chosen_by_validation": choice,
            "validation": {
                r: {
                    "runs": v,
                    "median_val_auc": statistics.median(x["val_auc"] for x in v),
                    "median_val_acc": statistics.median(x["val_acc"] for x in v),
                }
                for r, v in runs.items()
            },
            "test": tested,
            "published_resnet18": PUBLISHED[name],
        }
    return results


def best_overall(results: dict[str, Any]) -> str:
    """The recipe `--recipe best` should name: highest mean over datasets of its median validation AUC."""
    recipes = set.intersection(*(set(r["validation"]) for r in results.values()))
    return max(
        sorted(recipes),
        key=lambda rec: statistics.mean(r["validation"][rec]["median_val_auc"] for r in results.values()),
    )


def markdown(results: dict[str, Any], seeds: list[int]) -> str:
    lines = [
        f"Test split, medians over seeds {', '.join(map(str, seeds))}; recipe chosen on validation AUC only.",
        "",
        "| dataset | model | float ACC | float AUC | int8 ACC | int8 AUC | top-1 agreement | "
        "int8-softmax AUC | MedMNIST v2 ResNet-18 ACC / AUC |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, res in results.items():
        pub = res["published_resnet18"]
        for recipe, t in res["test"].items():
            m = t["median"]
            label = recipe + (" (chosen)" if recipe == res["chosen_by_validation"] else "")
            soft = f"{m['test_int8_softmax_auc']:.3f}" if "test_int8_softmax_auc" in m else "-"
            lines.append(
                f"| {name} | {label} | {m['test_float_acc']:.3f} | {m['test_float_auc']:.3f} | "
                f"{m['test_int8_acc']:.3f} | {m['test_int8_auc']:.3f} | {m['agreement']:.3f} | {soft} | "
                f"{pub['acc']:.3f} / {pub['auc']:.3f} |"
            )
    lines.append("")
    lines.append(f"`--recipe best` = {best_overall(results)} (highest mean of per-dataset median validation AUC).")
    lines.append("")
    lines.append(
        "Validation medians per recipe: "
        + "; ".join(
            f"{n} {r} ACC {v['median_val_acc']:.3f} AUC {v['median_val_auc']:.3f}"
            for n, res in results.items()
            for r, v in res["validation"].items()
        )
    )
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=["breastmnist", "pneumoniamnist"])
    p.add_argument("--recipes", nargs="+", default=["reference", "bn_gap_auc", "bn_gap_auc_unweighted"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--max-epochs", type=int, help="cap every recipe's epochs (default: the recipe's own)")
    p.add_argument("--threads", type=int, default=2, help="TensorFlow threads (default 2)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args()
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="edgemed-bench-") as work:
        results = run(args.datasets, args.recipes, args.seeds, args.max_epochs, Path(work))
    for res in results.values():
        for t in res["test"].values():
            for r in t["runs"]:
                r["model"] = Path(r["model"]).name
        for v in res["validation"].values():
            for r in v["runs"]:
                r["model"] = Path(r["model"]).name
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "seeds": args.seeds,
        "recipes": args.recipes,
        "max_epochs": args.max_epochs,
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "minutes": round((time.perf_counter() - start) / 60, 1),
        "best_recipe_by_validation": best_overall(results),
    }
    (args.out / "accuracy.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    table = markdown(results, args.seeds)
    (args.out / "accuracy.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
