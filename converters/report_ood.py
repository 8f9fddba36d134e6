"""The "Out-of-distribution" section of ``report.html``: how far each OOD score tells other images apart.

For the int8 file (else the first converted one): histograms of every score (the max-softmax baseline, energy, the
feature score) on the validation split the thresholds were chosen on, on the held-out split and on each
``--ood-eval`` set, with the threshold drawn in. For every converted file: its thresholds, the split sizes, the
feature score's rank agreement with the float model, and a table of the fraction flagged, AUROC and FPR at 95%
TPR (against the held-out split) per set and score.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from converters.ood import SCORE_NAMES

if TYPE_CHECKING:
    from converters.ood_step import OodOutcome

TITLES = {"max_softmax": "max-softmax (baseline)", "energy": "energy", "features": "feature score"}


def ood_section(outcomes: Sequence[OodOutcome], png: Callable[[Any], str]) -> str:
    """The section's HTML; ``png`` turns a matplotlib figure into an embedded image."""
    head = "<h2>Out-of-distribution</h2>"
    if not outcomes:
        return head + "<p>No out-of-distribution scores were fitted (<code>--ood none</code>).</p>"
    main = next((o for o in outcomes if o.target == "int8"), outcomes[0])
    parts = [head, _intro(main)]
    if main.scores:
        parts.append(f'<img alt="OOD score histograms ({html.escape(main.target)})" src="{png(_histograms(main))}">')
    parts.extend(_target_tables(o) for o in outcomes)
    return "\n".join(parts)


def _intro(main: OodOutcome) -> str:
    spec = main.spec
    if spec is None:
        return f"<p>{html.escape('; '.join(main.notes) or 'not fitted')}</p>"
    return (
        f"<p>Each file's scores were fitted on its own outputs on the <b>{html.escape(spec.fit_split)}</b> split "
        f"({spec.fit_n} images) and thresholded on the <b>{html.escape(spec.threshold_split)}</b> split "
        f"({spec.threshold_n} images) to flag {100 * spec.target_fraction:.1f}% of them (never the test split). "
        f"The device uses <b>{html.escape(spec.default)}</b> unless its profile says otherwise. Higher scores are "
        f"less like the training images; AUROC and FPR at 95% TPR (the share of an OOD set still accepted where "
        f"95% of in-distribution images are) compare each set with the <b>{html.escape(main.held_split)}</b> "
        "split. Max-softmax is the baseline, not shipped; its threshold is chosen the same way for comparison.</p>"
    )


def _histograms(outcome: OodOutcome) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores = [s for s in SCORE_NAMES if any(s in by_score for by_score in outcome.scores.values())]
    fig, axes = plt.subplots(1, len(scores), figsize=(4.6 * len(scores), 3.4), squeeze=False)
    thresholds = outcome.thresholds()
    for ax, score in zip(axes[0], scores, strict=True):
        values = {name: by_score[score] for name, by_score in outcome.scores.items() if score in by_score}
        finite = np.concatenate([v[np.isfinite(v)] for v in values.values()])
        edges = _edges(finite)
        for name, v in values.items():
            # Densities, so a set of 12 images and a split of 600 share one axis.
            ax.hist(v[np.isfinite(v)], bins=edges, density=True, histtype="step", linewidth=1.4, label=name)
        if score in thresholds:
            ax.axvline(thresholds[score], color="black", linestyle="--", linewidth=1, label="threshold")
        if edges[-1] - edges[-2] > 8 * (edges[1] - edges[0]):
            ax.set_xscale("asinh")  # an OOD set far out would squeeze the in-distribution scores into one bin
        ax.set_title(f"{outcome.target}: {TITLES[score]}", fontsize=9)
        ax.set_xlabel("score (higher: less like the training images)")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("density")
    fig.tight_layout()
    return fig


def _edges(values: np.ndarray, bins: int = 40) -> np.ndarray:
    """Histogram bin edges: even, or even in asinh (nearly log beyond the bulk) when a far tail would leave the
    in-distribution scores a single bin (the feature score of another modality can be 50x the threshold)."""
    if values.size == 0:
        return np.linspace(0.0, 1.0, bins + 1)
    lo, hi = float(values.min()), float(values.max())
    q25, q75 = np.percentile(values, [25, 75])
    if hi - lo <= 20 * max(float(q75 - q25), 1e-12):
        return np.histogram_bin_edges(values, bins=bins)
    return np.sinh(np.linspace(np.arcsinh(lo), np.arcsinh(hi), bins + 1))


def _target_tables(outcome: OodOutcome) -> str:
    esc = html.escape
    spec = outcome.spec
    title = f"<h3>{esc(outcome.target)}</h3>"
    if spec is None:
        return title + f"<p>{esc('; '.join(outcome.notes) or 'not fitted')}</p>"
    rows = ""
    for score, threshold in outcome.thresholds().items():
        section = spec.method(score) if score in ("energy", "features") else None  # type: ignore[arg-type]
        flagged = section.flagged_fraction if section is not None else _flagged(outcome, "val", score, threshold)
        role = "default" if score == spec.default else ("shipped" if section is not None else "baseline only")
        rows += (
            f"<tr><td>{esc(TITLES[score])}</td><td>{esc(role)}</td><td>{threshold:.5g}</td>"
            f"<td>{_pct(flagged)}</td></tr>"
        )
    agreement = spec.feature_rank_agreement
    if agreement is None:
        why = "no feature score" if spec.features is None else "not measured, see the notes below"
        rank = f"<p>Feature rank agreement with the float model: n/a ({why}).</p>"
    else:
        css = ' class="weak"' if agreement < 0.95 else ""
        rank = (
            f"<p{css}>Feature score rank agreement with the float Keras model on the {esc(spec.threshold_split)} "
            f"split (Spearman): <b>{agreement:.4f}</b>{' (below 0.95)' if agreement < 0.95 else ''}.</p>"
        )
    sizes = ", ".join(f"{esc(name)} {n}" for name, n in outcome.sizes.items())
    table = "".join(
        f"<tr><td>{esc(r['set'])}</td><td>{r['n']}</td><td>{esc(TITLES[r['score']])}</td>"
        f"<td>{_pct(r['flagged'])}</td><td>{_num(r['auroc'])}</td><td>{_pct(r['fpr_at_95_tpr'])}</td></tr>"
        for r in outcome.table()
    )
    notes = "".join(f'<li class="weak">{esc(n)}</li>' for n in outcome.notes)
    return (
        f"{title}<p>Images per set: {sizes}.</p>"
        "<table><tr><th>score</th><th>role</th><th>threshold</th><th>flagged on val</th></tr>"
        f"{rows}</table>{rank}"
        "<table><tr><th>set</th><th>images</th><th>score</th><th>flagged</th><th>AUROC</th>"
        f"<th>FPR at 95% TPR</th></tr>{table}</table>"
        f"{'<ul>' + notes + '</ul>' if notes else ''}"
    )


def _flagged(outcome: OodOutcome, set_name: str, score: str, threshold: float) -> float:
    values = outcome.scores.get(set_name, {}).get(score)
    return float((values > threshold).mean()) if values is not None and values.size else math.nan


def _pct(v: float) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{100 * v:.1f}%"


def _num(v: float) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.4f}"
