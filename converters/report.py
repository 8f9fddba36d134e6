"""The conversion report: ``report.json`` (every number) and a self-contained ``report.html`` for a reviewer.

The HTML embeds its plots as base64 PNG (matplotlib, Agg backend), so it opens from a USB stick or an e-mail
attachment with no network and no other files: confusion matrices (float vs each converted model), ROC curves,
a reliability diagram, and size and latency bars; and, when the conversion fitted out-of-distribution scores,
their section (``converters.report_ood``): histograms, AUROC / FPR at 95% TPR / fraction flagged, thresholds.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from converters import metrics as M
from converters.gate import GateResult
from converters.metrics import ModelSummary
from converters.outcome import Conversion, EdgeTpuOutcome, TargetOutcome, jsonable
from edgemed.manifest import Manifest

if TYPE_CHECKING:
    from converters.ood_step import OodOutcome


def write_reports(manifest: Manifest, conversion: Conversion, ood: Sequence[OodOutcome] = ()) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.html`` into the conversion's output folder; returns their paths.

    ``ood``: each converted target's out-of-distribution outcome (``report.json``'s ``ood``, by target; the
    HTML's "Out-of-distribution" section).
    """
    out = conversion.out
    data = {
        "manifest": manifest.model_dump(mode="json", by_alias=True),
        "float": conversion.reference.summary.record(),
        "float_tflite": {"size_bytes": conversion.baseline.size_bytes, "latency_ms": conversion.baseline.latency_ms},
        "targets": {
            t.target: {
                "verdict": t.verdict,
                "file": str(t.path.relative_to(out)),
                "failed_criteria": t.gate.failed,
                "numbers": t.gate.numbers,
            }
            for t in conversion.targets
        },
        "edgetpu": conversion.edgetpu.record(out) if conversion.edgetpu is not None else None,
        "notes": conversion.notes,
        "ood": {o.target: o.record() for o in ood} or None,
    }
    json_path = out / "report.json"
    json_path.write_text(json.dumps(jsonable(data), indent=2) + "\n", encoding="utf-8")
    html_path = out / "report.html"
    html_path.write_text(_html(manifest, conversion, ood), encoding="utf-8")
    return json_path, html_path


def summary_lines(manifest: Manifest, float_summary: ModelSummary, gates: dict[str, GateResult]) -> list[str]:
    """The terminal summary: float numbers, then one line per artifact with its verdict and key numbers."""
    f = float_summary
    lines = [
        f"evaluation: {manifest.evaluation['split'] if manifest.evaluation else '?'} split, "
        f"{f.n} images; float accuracy {f.accuracy:.4f}, AUC {_fmt(f.roc_auc)}"
    ]
    for art in manifest.artifacts:
        g = gates.get(art.target)
        if g is None:
            lines.append(f"  {art.target:8s} {art.verdict:9s} {art.file} (twin {art.twin})")
            continue
        q = g.quantized
        sensitivity = " ".join(f"{r.label} {_fmt(r.sensitivity)}" for r in q.per_class)
        lines.append(
            f"  {art.target:8s} {verdict_text(art.verdict, art.clinically_weak)} accuracy {q.accuracy:.4f} "
            f"(drop {g.accuracy_drop:+.4f}), AUC {_fmt(q.roc_auc)} (drop {_fmt(g.auc_drop)}), "
            f"sensitivity {sensitivity}, top-1 agreement {g.agreement:.4f}, {art.size_bytes / 1024:.1f} KiB, "
            f"{g.latency_ms:.3f} ms  {art.file}"
        )
        lines.extend(f"      FAILED: {c}" for c in art.failed_criteria)
        lines.extend(f"      WARNING: {w}" for w in floor_warnings(art.clinically_weak, art.failed_criteria))
    return lines


def verdict_text(verdict: str, weak: list[str]) -> str:
    """The verdict as a person should read it: an accepted model under a clinical floor is no good model."""
    if verdict == "accepted" and weak:
        return "accepted as a faithful conversion, clinically weak:"
    return f"{verdict:9s}"


def floor_warnings(weak: list[str], failed: list[str]) -> list[str]:
    """The clinical floors missed that are not already listed as failed criteria (``--require-floors``)."""
    return [f"clinically weak: {w}" for w in weak if f"clinical floor: {w}" not in failed]


def _fmt(v: Any) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.4f}"


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _plots(conversion: Conversion) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, y, targets, baseline = conversion.labels, conversion.y, conversion.targets, conversion.baseline
    k = len(labels)
    models = [("float", conversion.reference.probs)] + [(t.target, t.probs) for t in targets]
    fig, axes = plt.subplots(1, len(models), figsize=(3.2 * len(models), 3.0), squeeze=False)
    for n, (ax, (title, probs)) in enumerate(zip(axes[0], models, strict=True)):
        cm = M.confusion(y, probs.argmax(1), k)
        ax.imshow(cm, cmap="Blues")
        for i in range(k):
            for j in range(k):
                dark = cm[i, j] > cm.max() / 2
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", color="white" if dark else "black")
        ax.set_title(title)
        ax.set_xticks(range(k), labels, rotation=45, ha="right")
        ax.set_yticks(range(k), labels if n == 0 else [""] * k)
        ax.set_xlabel("predicted")
    axes[0][0].set_ylabel("true")
    plots = {"confusion": _png(fig)}

    fig, ax = plt.subplots(figsize=(4.2, 4.0))
    positive = 1 if k == 2 else int(np.bincount(y, minlength=k).argmin())
    for title, probs in models:
        fpr, tpr = M.roc_curve((y == positive).astype(int), probs[:, positive])
        ax.plot(
            fpr,
            tpr,
            label=f"{title} (AUC {M.binary_auc((y == positive).astype(int), probs[:, positive]):.3f})",
        )
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel(f"sensitivity for {labels[positive]!r}")
    ax.legend(loc="lower right", fontsize=8)
    plots["roc"] = _png(fig)

    fig, ax = plt.subplots(figsize=(4.2, 4.0))
    for title, probs in models:
        conf, acc, counts = M.reliability(y, probs)
        sel = counts > 0
        ax.plot(conf[sel], acc[sel], "o-", label=title)
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=8)
    plots["reliability"] = _png(fig)

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
    names = ["float32"] + [t.target for t in targets]
    footprints = [baseline] + [t.footprint for t in targets]
    ax1.bar(names, [f.size_bytes / 1024 for f in footprints], color="tab:blue")
    ax1.set_ylabel("size (KiB)")
    ax2.bar(names, [f.latency_ms for f in footprints], color="tab:orange")
    ax2.set_ylabel("latency (ms)")
    ax2.set_title("median CPU latency, batch 1", fontsize=9)
    fig.tight_layout()
    plots["size_latency"] = _png(fig)
    return plots


def _html(manifest: Manifest, conversion: Conversion, ood: Sequence[OodOutcome] = ()) -> str:
    from converters.report_ood import ood_section

    esc = html.escape
    labels, targets, reference = manifest.labels, conversion.targets, conversion.reference.summary
    plots = _plots(conversion)
    base = conversion.baseline
    rows = [_row("float (Keras)", "reference", reference, None, base.size_bytes, base.latency_ms)]
    for t in targets:
        verdict = verdict_text(t.verdict, t.gate.weak).rstrip(":").strip()
        rows.append(_row(t.target, verdict, t.gate.quantized, t.gate, t.footprint.size_bytes, t.footprint.latency_ms))
    failed = "".join(f"<li><b>{esc(t.target)}</b>: {esc(c)}</li>" for t in targets for c in t.gate.failed)
    warnings = "".join(
        f'<li class="weak"><b>{esc(t.target)}</b> WARNING: {esc(w)}</li>'
        for t in targets
        for w in floor_warnings(t.gate.weak, t.gate.failed)
    )
    floors = _floors_table(targets)
    per_class = "".join(_per_class_rows(reference, t) for t in targets)
    tpu = _edgetpu_section(conversion.edgetpu)
    note_html = "".join(f"<li>{esc(n)}</li>" for n in conversion.notes)
    ev = manifest.evaluation or {}
    cal = manifest.calibration or {}
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>edgemed conversion report: {esc(manifest.name)}</title>
<style>body{{font-family:sans-serif;max-width:70em;margin:1em auto;padding:0 1em}}
table{{border-collapse:collapse;margin:.5em 0}}
td,th{{border:1px solid #bbb;padding:.25em .6em;text-align:right}}
th{{background:#eee}}.rejected{{color:#b00;font-weight:bold}}.accepted{{color:#070;font-weight:bold}}
.waived{{color:#a60;font-weight:bold}}.weak{{color:#a60}}img{{max-width:100%}}</style></head><body>
<h1>Conversion report: {esc(manifest.name)}</h1>
<p>Created {esc(manifest.created_at)}. Labels: {esc(", ".join(labels))}.
Input {manifest.input.height}x{manifest.input.width}
{esc(manifest.input.colour_mode)}. Evaluated on the <b>{esc(str(ev.get("split")))}</b> split
({esc(str(ev.get("count_per_class")))} images per class, sha256 {esc(str(ev.get("sha256", ""))[:16])}...);
calibrated on {esc(str(cal.get("count_per_class")))} training images per class
(sha256 {esc(str(cal.get("sha256", ""))[:16])}...).
Intervals are 95% (Wilson for proportions, bootstrap for AUC).</p>
<h2>Verdicts</h2>
<table><tr><th>model</th><th>verdict</th><th>accuracy [95% CI]</th><th>balanced acc.</th>
<th>ROC AUC [95% CI]</th>
<th>ECE</th><th>agreement</th><th>size</th><th>latency</th></tr>{"".join(rows)}</table>
{"<h3>Failed criteria</h3><ul>" + failed + "</ul>" if failed else "<p>Every criterion held.</p>"}
{
        "<h3>Clinically weak</h3><p>The conversion is faithful to the float model, but the model is under a clinical "
        "floor: accepted by default, rejected with --require-floors.</p><ul>" + warnings + "</ul>"
        if warnings
        else ""
    }
{"<h3>Notes</h3><ul>" + note_html + "</ul>" if note_html else ""}
<h2>Clinical floors (converted model)</h2>
<table><tr><th>model</th><th>class</th><th>sensitivity</th><th>floor</th><th>ROC AUC (one-vs-rest)</th>
<th>floor</th></tr>{floors}</table>
<h2>Per-class sensitivity and specificity (float → converted)</h2>
<table><tr><th>model</th><th>class</th><th>n</th><th>sensitivity</th><th>specificity</th>
<th>sensitivity 95% CI</th></tr>{per_class}</table>
<h2>Confusion matrices</h2><img alt="confusion matrices" src="{plots["confusion"]}">
<h2>ROC curves</h2><img alt="ROC curves" src="{plots["roc"]}">
<h2>Reliability diagram</h2><img alt="reliability diagram" src="{plots["reliability"]}">
<h2>Size and latency</h2><img alt="size and latency" src="{plots["size_latency"]}">
{tpu}
{ood_section(ood, _png)}
<h2>Versions</h2><p>{esc(", ".join(f"{k} {v}" for k, v in manifest.versions.items()))}</p>
</body></html>
"""


def _floors_table(targets: list[TargetOutcome]) -> str:
    out = ""
    for t in targets:
        for label, row in t.gate.floors.classes.items():
            out += (
                f"<tr><td>{html.escape(t.target)}</td><td>{html.escape(label)}</td>"
                f'<td class="{"weak" if row.under_sensitivity else ""}">{_pct(row.sensitivity)}</td>'
                f"<td>{_pct(row.min_sensitivity)}</td>"
                f'<td class="{"weak" if row.under_auc else ""}">{_fmt(row.roc_auc)}</td>'
                f"<td>{_fmt(row.min_auc)}</td></tr>"
            )
    return out


def _per_class_rows(reference: ModelSummary, target: TargetOutcome) -> str:
    out = ""
    esc = html.escape
    for fr, qr in zip(reference.per_class, target.gate.quantized.per_class, strict=True):
        out += (
            f"<tr><td>{esc(target.target)}</td><td>{esc(fr.label)}</td><td>{fr.n}</td>"
            f"<td>{_pct(fr.sensitivity)} → {_pct(qr.sensitivity)}</td>"
            f"<td>{_pct(fr.specificity)} → {_pct(qr.specificity)}</td>"
            f"<td>[{_pct(qr.sensitivity_ci[0])}, {_pct(qr.sensitivity_ci[1])}]</td></tr>"
        )
    return out


def _edgetpu_section(tpu: EdgeTpuOutcome | None) -> str:
    if tpu is None:
        return ""
    esc = html.escape
    problems = "".join(f"<li>{esc(p)}</li>" for p in tpu.problems) or "<li>none</li>"
    run = tpu.compiler
    comp_text = (
        "edgetpu_compiler not on PATH: no Edge TPU file; the CPU int8 twin is the fallback"
        if run is None
        else f"compiler {esc(run.version)}: {run.ops_on_tpu} of {run.total_ops} ops on the Edge TPU, "
        f"{run.ops_on_cpu} on the CPU"
    )
    return f"<h2>Edge TPU</h2><p>{comp_text}</p><p>Compatibility problems:</p><ul>{problems}</ul>"


def _pct(v: Any) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{100 * v:.1f}%"


def _row(name: str, verdict: str, s: ModelSummary, gate: GateResult | None, size: int, latency: float) -> str:
    agreement = f"{100 * gate.agreement:.1f}%" if gate is not None else "-"
    css = "weak" if "clinically weak" in verdict else verdict.split()[0]
    return (
        f'<tr><td>{html.escape(name)}</td><td class="{css}">{html.escape(verdict)}</td>'
        f"<td>{_pct(s.accuracy)} [{_pct(s.accuracy_ci[0])}, {_pct(s.accuracy_ci[1])}]</td>"
        f"<td>{_pct(s.balanced_accuracy)}</td>"
        f"<td>{_fmt(s.roc_auc)} [{_fmt(s.roc_auc_ci[0])}, {_fmt(s.roc_auc_ci[1])}]</td>"
        f"<td>{s.ece:.4f}</td><td>{agreement}</td><td>{size / 1024:.1f} KiB</td>"
        f"<td>{latency:.3f} ms</td></tr>"
    )
