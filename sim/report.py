"""The demo's report: ``report.md`` and PNG plots of a closed-loop run, in its run folder.

Plots: click-through rate beside the oracle's and a popularity policy's on the same requests; the
served model's click quality beside its running-CTR baseline; drift PSI with the preference shift
and every step with a drift alarm marked; anomalies with the attack window marked. The
display-bias comparison (``sim.bias``) and the steady phase's A/B test (``summary["ab"]``, from
``serving.ab_log``: CTR per variant, the model's lift over the popularity control, intervals
clustered by user) are tables.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from serving.ab_log import format_table  # noqa: E402


def _phase_spans(ax, phases: list[str], highlight: dict[str, str]) -> None:
    for phase, colour in highlight.items():
        steps = [i for i, p in enumerate(phases) if p == phase]
        if steps:
            ax.axvspan(steps[0] - 0.5, steps[-1] + 0.5, color=colour, alpha=0.15, label=phase)


def _plot(path: Path, title: str, ylabel: str, series: dict[str, list[float]], phases: list[str],
          highlight: dict[str, str], marks: list[int] | None = None, mark_label: str = "") -> None:
    fig, ax = plt.subplots(figsize=(8, 3.2))
    for label, values in series.items():
        dashed = label.startswith(("oracle", "popularity", "baseline"))
        ax.plot(range(len(values)), values, marker="" if dashed else ".", linestyle="--" if dashed else "-",
                label=label)
    _phase_spans(ax, phases, highlight)
    for i, step in enumerate(marks or []):
        ax.axvline(step, color="red", linewidth=0.8, alpha=0.6, label=mark_label if i == 0 else None)
    ax.set_title(title)
    ax.set_xlabel("simulation step")
    ax.set_ylabel(ylabel)
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _ab_lines(ab: dict | None) -> list[str]:
    """The A/B section: the comparison's table and the lift with its interval (or why there is none)."""
    if not ab:
        return []
    lines = ["## A/B test in the steady phase: the online model against a popularity control", ""]
    if "error" in ab:
        return lines + [f"No comparison: {ab['error']}", ""]
    lines += ["Users split 1:1 by a keyed hash of `user_id` (`streamrec serve --variant`); CTR per shown item "
              "from the log, clicks joined by `request_id`; 95% intervals clustered by user (docs/ab.md).", "",
              f"```\n{format_table(ab)}\n```", ""]
    for c in ab["comparisons"]:
        lift, (lo, hi) = c["lift"], c["lift_ci"]
        if lift is not None and lo is not None:
            lines += [f"Lift of `{c['variant']}` over `{c['control']}`: **{lift * 100:+.1f}%** "
                      f"(95% CI {lo * 100:+.1f}% to {hi * 100:+.1f}%).", ""]
    return lines


def write_report(run: Path, rows: list[dict], summary: dict, bias: dict | None) -> Path:
    """Write the plots and ``report.md``; ``rows`` has one dict per step (see ``sim.demo``)."""
    phases = [r["phase"] for r in rows]
    shades = {"warmup": "grey", "attack": "red", "shift": "orange"}
    _plot(run / "ctr.png", "Click-through rate of normal users (per shown item), with its references", "CTR",
          {"CTR (online model)": [r["ctr"] for r in rows], "oracle (true best slates)": [r["ctr_oracle"] for r in rows],
           "popularity policy": [r["ctr_popularity"] for r in rows]}, phases, shades)
    _plot(run / "rmse.png", "Served click quality against the running-CTR baseline (lower is better)", "RMSE / log loss",
          {"served RMSE": [r["served_rmse"] for r in rows], "baseline RMSE": [r["baseline_rmse"] for r in rows],
           "served log loss": [r["logloss"] for r in rows], "baseline log loss": [r["baseline_logloss"] for r in rows]},
          phases, shades)
    _plot(run / "drift.png", "Drift: population stability index (shift shaded, alarms in red)", "PSI",
          {signal: [r["psi"].get(signal, float("nan")) for r in rows] for signal in summary["psi_signals"]},
          phases, {"shift": "orange"}, marks=[r["step"] for r in rows if r["drift_alarms"]], mark_label="drift alarm")
    _plot(run / "anomalies.png", "Anomalies (attack marked)", "per step",
          {"anomaly records": [r["anomalies"] for r in rows],
           "examples flagged anomalous": [r["flagged_examples"] for r in rows]},
          phases, {"attack": "red"})
    lines = [
        "# streamrec demo report", "",
        f"Run folder: `{run}`", "",
        "| figure | value |", "|---|---|",
        *(f"| {k} | {v} |" for k, v in summary["figures"].items()), "",
        "Served click quality beside its reference (steady phase; `summary.json` `checks`):", "",
        "| check | value |", "|---|---|",
        *(f"| {k} | {v if not isinstance(v, float) else round(v, 4)} |" for k, v in summary.get("checks", {}).items()), "",
        "![CTR](ctr.png)", "", "![RMSE](rmse.png)", "", "![drift](drift.png)", "", "![anomalies](anomalies.png)", "",
    ]
    lines += _ab_lines(summary.get("ab"))
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
    lines += ["## Per step", "",
              "| step | phase | requests | CTR | oracle CTR | popularity CTR | served RMSE | baseline RMSE | "
              "calibration | drift alarms | anomalies | model |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|",
              *(f"| {r['step']} | {r['phase']} | {r['requests']} | {r['ctr']:.4f} | {r['ctr_oracle']:.4f} | "
                f"{r['ctr_popularity']:.4f} | {r['served_rmse']:.4f} | {r['baseline_rmse']:.4f} | "
                f"{r['calibration']:.2f} | {', '.join(r['drift_alarms']) or '-'} | {r['anomalies']} | "
                f"{r['model_version']} |" for r in rows)]
    path = run / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
