"""The Keras models the OOD benchmark converts: trained once per (dataset, recipe, seed), cached on disk.

Training does not depend on the OOD code, so the models can be trained ahead of the benchmark (and are: run
this module as a script, in the background, with ``nice``). A cached model lives in
``<cache>/<dataset>_<recipe>_s<seed>/`` as ``model.keras`` + ``model.labels.json`` + ``train.json``;
``train.json`` is written last, so a folder without it is an interrupted run and is trained again. Training
happens in a temporary sibling folder that is renamed into place, so two processes never see half a model.

    nice -n 15 python benchmarks/_ood_models.py --threads 1          # all 12 models
    python benchmarks/_ood_models.py --datasets breastmnist --recipes reference --seeds 0

Uses TensorFlow (``converters.train``); labels as in ``bench_accuracy.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("KERAS_HOME", tempfile.mkdtemp(prefix="edgemed-bench-keras-"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

#: Class names in label order, as bench_accuracy.py gives them.
LABELS = {"breastmnist": ["malignant", "benign"], "pneumoniamnist": ["normal", "pneumonia"]}
DATASETS = ("breastmnist", "pneumoniamnist")
RECIPES = ("reference", "best")
SEEDS = (0, 1, 2)
DEFAULT_CACHE = Path("/work/bench-cache/ood")


def data_dir() -> Path:
    """``$EDGEMED_DATA``, default ``../shared/data`` next to the repository."""
    return Path(os.environ.get("EDGEMED_DATA", ROOT.parent / "shared" / "data"))


@dataclass(frozen=True)
class CachedModel:
    """A trained model on disk and how it was trained (``train.json``)."""

    dataset: str
    recipe: str
    seed: int
    model_path: Path
    info: dict[str, Any]


def key(dataset: str, recipe: str, seed: int, epochs: int | None = None) -> str:
    """Cache folder name; a capped-epoch (quick) model never shares a folder with a full one."""
    return f"{dataset}_{recipe}_s{seed}" + (f"_e{epochs}" if epochs else "")


def cached(cache: Path, dataset: str, recipe: str, seed: int, epochs: int | None = None) -> CachedModel | None:
    """The finished cached model, or None when it has not been trained (or training was interrupted)."""
    folder = cache / key(dataset, recipe, seed, epochs)
    done = folder / "train.json"
    if not done.is_file() or not (folder / "model.keras").is_file():
        return None
    return CachedModel(dataset, recipe, seed, folder / "model.keras", json.loads(done.read_text()))


def get_model(
    cache: Path, dataset: str, recipe: str, seed: int, epochs: int | None = None, log: bool = True
) -> CachedModel:
    """The cached model for (dataset, recipe, seed), training and caching it first when absent."""
    hit = cached(cache, dataset, recipe, seed, epochs)
    if hit is not None:
        return hit
    from converters.data import load_dataset
    from converters.train import train

    cache.mkdir(parents=True, exist_ok=True)
    final = cache / key(dataset, recipe, seed, epochs)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=cache))
    start = time.perf_counter()
    try:
        ds = load_dataset(data_dir() / f"{dataset}_28.npz", labels=LABELS[dataset])
        tr = train(ds, tmp, recipe=recipe, seed=seed, epochs=epochs, progress=False, name="model")
        info = {
            "dataset": dataset,
            "recipe": recipe,
            "resolved_recipe": tr.recipe,
            "seed": seed,
            "max_epochs": epochs,
            "epochs_run": tr.epochs_run,
            "best_epoch": tr.best_epoch,
            "val_loss": tr.val_loss,
            "val_accuracy": tr.val_accuracy,
            "train_s": round(time.perf_counter() - start, 1),
        }
        (tmp / "train.json").write_text(json.dumps(info, indent=2) + "\n")
        if final.exists():  # an interrupted earlier run left it without train.json
            shutil.rmtree(final)
        tmp.rename(final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    if log:
        print(
            f"trained {final.name}: {info['resolved_recipe']}, {info['epochs_run']} epochs, "
            f"val acc {info['val_accuracy']:.3f}, {info['train_s']:.0f} s",
            flush=True,
        )
    hit = cached(cache, dataset, recipe, seed, epochs)
    assert hit is not None, final
    return hit


def set_threads(threads: int) -> None:
    """Limit TensorFlow to ``threads`` intra-op threads and one inter-op thread (the machine is shared)."""
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    p.add_argument("--recipes", nargs="+", default=list(RECIPES))
    p.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    p.add_argument("--max-epochs", type=int, help="cap the recipe's epochs (cached under a separate key)")
    p.add_argument("--threads", type=int, default=1, help="TensorFlow threads (default 1)")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"model cache (default {DEFAULT_CACHE})")
    args = p.parse_args()
    set_threads(args.threads)
    for dataset in args.datasets:
        for recipe in args.recipes:
            for seed in args.seeds:
                m = get_model(args.cache, dataset, recipe, seed, args.max_epochs)
                print(f"ready {m.model_path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
