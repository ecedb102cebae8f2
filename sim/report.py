"""The demo's report: ``report.md`` and PNG plots of a closed-loop run, in its run folder.

Plots: click-through rate and served RMSE over time, drift PSI with the preference shift marked,
anomalies with the attack window marked. The display-bias comparison (``bench.bias``) is a table.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def _phase_spans(ax, phases: list[str], highlight: dict[str, str]) -> None:
    for phase, colour in highlight.items():
        steps = [i for i, p in enumerate(phases) if p == phase]
        if steps:
            ax.axvspan(steps[0] - 0.5, steps[-1] + 0.5, color=colour, alpha=0.15, label=phase)


def _plot(path: Path, title: str, ylabel: str, series: dict[str, list[float]], phases: list[str],
          highlight: dict[str, str]) -> None:
    fig, ax = plt.subplots(figsize=(8, 3.2))
    for label, values in series.items():
        ax.plot(range(len(values)), values, marker=".", label=label)
    _phase_spans(ax, phases, highlight)
    ax.set_title(title)
    ax.set_xlabel("simulation step")
    ax.set_ylabel(ylabel)
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(run: Path, rows: list[dict], summary: dict, bias: dict | None) -> Path:
    """Write the plots and ``report.md``; ``rows`` has one dict per step (see ``sim.demo``)."""
    phases = [r["phase"] for r in rows]
    shades = {"warmup": "grey", "attack": "red", "shift": "orange"}
    _plot(run / "ctr.png", "Click-through rate of normal users (per shown item)", "CTR",
          {"CTR": [r["ctr"] for r in rows]}, phases, shades)
    _plot(run / "rmse.png", "Served RMSE (click probability) and the learner's prequential RMSE", "RMSE",
          {"served": [r["served_rmse"] for r in rows], "prequential": [r["prequential_rmse"] for r in rows]},
          phases, shades)
    _plot(run / "drift.png", "Drift: population stability index (shift marked)", "PSI",
          {signal: [r["psi"].get(signal, float("nan")) for r in rows] for signal in summary["psi_signals"]},
          phases, {"shift": "orange"})
    _plot(run / "anomalies.png", "Anomalies (attack marked)", "per step",
          {"anomaly records": [r["anomalies"] for r in rows],
           "examples flagged anomalous": [r["flagged_examples"] for r in rows]},
          phases, {"attack": "red"})
    lines = [
        "# streamrec demo report", "",
        f"Run folder: `{run}`", "",
        "| figure | value |", "|---|---|",
        *(f"| {k} | {v} |" for k, v in summary["figures"].items()), "",
        "![CTR](ctr.png)", "", "![RMSE](rmse.png)", "", "![drift](drift.png)", "", "![anomalies](anomalies.png)", "",
    ]
    if bias:
        lines += ["## Display bias: raw clicks vs inverse-propensity correction (`bench.bias`)", "",
                  "| figure | value |", "|---|---|",
                  *(f"| {k} | {v} |" for k, v in bias.items() if not isinstance(v, (list, dict))), ""]
        if "obd_position_ctr_random" in bias:
            lines += ["Open Bandit sample: per-position CTR of the uniform-random logs (relative to position 1) "
                      "against the examination curve estimated on the Thompson-sampling logs:", "",
                      "| position | CTR ratio, random | examination estimate, bts |", "|---|---|---|",
                      *(f"| {p + 1} | {a:.3f} | {b:.3f} |" for p, (a, b) in
                        enumerate(zip(bias["obd_position_ctr_random"], bias["obd_examination_bts"]))), ""]
    lines += ["## Per step", "", "| step | phase | requests | CTR | served RMSE | max PSI | anomalies | model |",
              "|---|---|---|---|---|---|---|---|",
              *(f"| {r['step']} | {r['phase']} | {r['requests']} | {r['ctr']:.4f} | {r['served_rmse']:.4f} | "
                f"{max(r['psi'].values(), default=float('nan')):.3f} | {r['anomalies']} | {r['model_version']} |"
                for r in rows)]
    path = run / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
