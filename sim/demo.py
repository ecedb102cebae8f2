"""``streamrec demo``: the whole loop on the local broker, watched live, with a report at the end.

It starts what is not running (the local broker unless a cluster is given) and, each as its own
process with its log in the run folder, the stream worker, the learner and serving. Then simulated
users (``sim.simulator``) ask serving for slates over HTTP, look at them with position bias,
click, and log impressions and clicks through the producer SDK (``sim.closed_loop``), through
four phases: warm-up, steady state, a click-flood bot attack, a preference shift. A line per step
shows events/s, click-through rate, served RMSE, anomalies, drift and the model version. The
steady phase is an A/B test: its requests go to a second serving replica that splits the users
between the online model and a popularity control (``streamrec serve --variant``), and the
report compares their CTR from the log, with the lift and its interval (``serving.ab_log``). At the
end it writes ``report.md`` and plots to the run folder, prints what the stream logged, and stops
everything it started (Ctrl-C included).
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from contextlib import ExitStack
from pathlib import Path

from stream.tools import kafka_local
from sim.closed_loop import ClosedLoop
from stream.config import PROJECT_ROOT, SHARED_DATA
from stream.topics import Topics
from stream.log.table import EVENTS, EXAMPLES, DeltaLog
from stream.log.export import export_obp
from stream.tools.scrape import scrape, total
from stream.tools.processes import spawn, stop
from stream.producer import EventProducer
from sim.report import write_report
from serving.ab_log import compare_variants, format_table, slates_from_log
from sim.simulator import Schedule, Simulation
from stream.topics import ensure_topics

log = logging.getLogger(__name__)

BROKEN_MESSAGES = [
    b"{this is not json",
    b"\xff\xfe not utf-8",
    json.dumps({"event_id": "x1", "type": "purchase", "user_id": "u", "ts": 1.0, "schema_version": 1}).encode(),
    json.dumps({"event_id": "x2", "type": "rating", "user_id": "u", "ts": 1.0, "schema_version": 1,
                "item_id": "i", "value": "five"}).encode(),
    json.dumps({"event_id": "x3", "type": "impression", "user_id": "u", "ts": 1.0, "schema_version": 1,
                "request_id": "r", "model_version": "m", "policy": "greedy",
                "items": [{"item_id": "a", "position": 1, "propensity": 0}]}).encode(),
]


# The steady phase's A/B test (docs/ab.md): the online model against a popularity control, users split 1:1.
AB_VARIANTS = ("model=live/epsilon_greedy:1", "control=popularity/epsilon_greedy:1")


# Event-time seconds a slate waits for its clicks, for the worker, the learner, serving and the A/B
# comparison: one step of the simulated schedule. The simulated users click 1 s + Exp(8 s) after the
# slate (``Simulation.click_delay_s``), so 60 s attributes 99.94% of clicks; a longer window only
# delays every settled outcome, and with it the click calibration (docs/monitoring.md).
ATTRIBUTION_WINDOW_S = 60.0

def _labelled(samples: dict, name: str, label: str) -> dict[str, float]:
    return {dict(labels).get(label, ""): value for (sample, labels), value in samples.items() if sample == name}


def _check_alive(procs: dict[str, subprocess.Popen]) -> None:
    for name, proc in procs.items():
        if proc.poll() is not None:
            raise RuntimeError(f"the {name} exited during start-up; see {name}.log in the run folder")


def _wait_ready(url: str, procs: dict[str, subprocess.Popen], timeout_s: float) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        _check_alive(procs)
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer within {timeout_s:.0f} s")


def _wait_consuming(worker_port: int, dead_letters: int, procs: dict[str, subprocess.Popen], timeout_s: float) -> None:
    """Wait until the worker has put the broken messages on the DLQ: it consumes, so the
    schedule's steps measure the loop rather than the worker's start-up (slow on a busy machine)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        _check_alive(procs)
        try:
            if total(scrape(f"http://127.0.0.1:{worker_port}/metrics"), "streamrec_dlq_total") >= dead_letters:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the worker did not consume its first messages within {timeout_s:.0f} s; see worker.log")


def run_demo(quick: bool = False, bootstrap: str | None = None, run_dir: str | None = None, seed: int = 0) -> int:
    """Run the demo (module docstring); ``seed`` seeds the simulated world, its users and their clicks."""
    run = Path(run_dir or PROJECT_ROOT / "runs" / time.strftime("%Y%m%d-%H%M%S")).resolve()
    run.mkdir(parents=True, exist_ok=True)
    print(f"streamrec demo{' (quick)' if quick else ''}, seed {seed}: run folder {run}", flush=True)
    with ExitStack() as stack:
        bootstrap = bootstrap or os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
        if not bootstrap:
            already = kafka_local.status()
            broker = kafka_local.start()
            if already is None:
                stack.callback(kafka_local.stop)
            bootstrap = broker.bootstrap_servers
        topics = Topics(f"demo{time.strftime('%Y%m%d%H%M%S')}.")
        ensure_topics(bootstrap, 4, topics)
        ports = {name: kafka_local.free_port() for name in ("worker", "learner", "serving", "ab")}
        common = ["--bootstrap-servers", bootstrap, "--topic-prefix", topics.prefix]
        procs = {
            "worker": spawn(run, "worker", "worker", *common, "--log-dir", str(run / "log"),
                             "--web-port", str(ports["worker"]), "--attribution-window-s", str(ATTRIBUTION_WINDOW_S)),
            "learner": spawn(run, "learner", "learner", *common, "--store-dir", str(run / "models"),
                              "--checkpoint-dir", str(run / "checkpoints"), "--web-port", str(ports["learner"]),
                              "--n-factors", "16", "--publish-interval-s", "1", "--snapshot-interval-s", "20",
                              "--attribution-window-s", str(ATTRIBUTION_WINDOW_S)),
            "serving": spawn(run, "serving", "serve", *common, "--store-dir", str(run / "models"),
                              "--port", str(ports["serving"]), "--kind", "click", "--seed", "0",
                              "--attribution-window-s", str(ATTRIBUTION_WINDOW_S)),
            "ab": spawn(run, "ab", "serve", *common, "--store-dir", str(run / "models"), "--port", str(ports["ab"]),
                        "--kind", "click", "--seed", "1", "--attribution-window-s", str(ATTRIBUTION_WINDOW_S),
                        *(f"--variant={variant}" for variant in AB_VARIANTS)),
        }
        for proc in procs.values():
            stack.callback(stop, proc)
        print(f"Kafka {bootstrap}; worker, learner, serving and the A/B serving replica started (logs in {run})",
              flush=True)
        serve_url, ab_url = (f"http://127.0.0.1:{ports[name]}" for name in ("serving", "ab"))
        for url in (serve_url, ab_url):
            _wait_ready(f"{url}/healthz", procs, 120)

        schedule = Schedule(warmup=4, steady=10, attack=4, shift=8) if quick else Schedule(6, 30, 8, 20)
        sim = Simulation.planted(n_users=200 if quick else 600, n_items=100 if quick else 300, seed=seed,
                                 schedule=schedule, shift_items=True)
        rows = []
        with EventProducer(bootstrap, topic=topics.events) as producer:
            for raw in BROKEN_MESSAGES:
                producer.send_raw(raw, key=b"demo")
            producer.flush()
            _wait_consuming(ports["worker"], len(BROKEN_MESSAGES), procs, 180)
            loop = ClosedLoop(sim, serve_url, producer, policy="epsilon_greedy", k=10, seed=seed)
            print(f"{'step':>4} {'phase':<7} {'events/s':>8} {'CTR':>6} {'oracle':>6} {'popular':>7} "
                  f"{'RMSE':>6} {'base':>6} {'calib':>5} {'anomalies':>9} {'alarms':<18} model", flush=True)
            for step in range(schedule.n_steps):
                started = time.monotonic()
                loop.serve_url = ab_url if sim.phase(step) == "steady" else serve_url  # the A/B test
                stats = loop.run_step(step)
                time.sleep(0.5 if quick else 1.0)  # let the learner publish and serving apply it
                rows.append(_observe(step, stats, ports, time.monotonic() - started, rows))
                _print_row(rows[-1])
                for name, proc in procs.items():
                    if proc.poll() is not None:
                        raise RuntimeError(f"the {name} exited; see {name}.log in the run folder")
        time.sleep(3)
        samples = {name: scrape(f"http://127.0.0.1:{port}/metrics") for name, port in ports.items()}
        bias = _bias_comparison(quick)
        summary = _summary(rows, samples, bias)
        ab = summary["ab"] = _ab_comparison(run, samples["ab"])
        checks = summary["checks"] = quality_checks(rows, schedule)
        checks.update(ab_checks(ab))
        report = write_report(run, rows, summary, bias)
        (run / "summary.json").write_text(json.dumps({"summary": summary, "checks": checks, "seed": seed,
                                                      "steps": rows, "bias": bias}, indent=1, default=str))
        if "error" not in ab:
            print(format_table(ab), flush=True)
        print("checks:", json.dumps(checks), flush=True)
        _print_log_summary(run, samples["worker"])
        print(f"\nreport: {report} (plots ctr.png, rmse.png, drift.png, anomalies.png beside it)", flush=True)
    return 0


def _observe(step: int, stats, ports: dict[str, int], seconds: float, rows: list[dict]) -> dict:
    worker = scrape(f"http://127.0.0.1:{ports['worker']}/metrics")
    learner = scrape(f"http://127.0.0.1:{ports['learner']}/metrics")
    serving = scrape(f"http://127.0.0.1:{ports['serving']}/metrics")
    events = total(worker, "streamrec_events_total")
    anomalies = total(worker, "streamrec_anomalies_total")
    flagged = total(worker, "streamrec_examples_flagged_anomalous_total")
    previous = rows[-1] if rows else {"events_total": 0.0, "anomalies_total": 0.0, "flagged_total": 0.0}
    versions = [v for v, value in _labelled(serving, "streamrec_model_info", "version").items() if value == 1]
    served = {name: _labelled(serving, f"streamrec_{name}", "kind").get("click", float("nan"))
              for name in ("served_rmse", "served_baseline_rmse")}
    single = {name: total(serving, f"streamrec_{name}") if _has(serving, f"streamrec_{name}") else float("nan")
              for name in ("served_logloss", "served_baseline_logloss", "served_auc", "served_calibration")}
    # a signal alarmed in this step if its gauge is up now or its alarm counter rose since the last
    # step (a Page-Hinkley alarm's gauge holds for 500 outcomes, less than a step of the full demo)
    raised = _labelled(serving, "streamrec_drift_alarms_total", "signal")
    before = previous.get("drift_alarms_total", {})
    alarms = sorted({signal for signal, value in _labelled(serving, "streamrec_drift_alarm", "signal").items()
                     if value == 1} | {signal for signal, n in raised.items() if n > before.get(signal, 0.0)})
    return {
        "step": step, "phase": stats.phase, "requests": stats.requests, "ctr": stats.ctr,
        "ctr_oracle": stats.ctr_oracle, "ctr_popularity": stats.ctr_popularity,
        "baseline_rmse": served["served_baseline_rmse"], "logloss": single["served_logloss"],
        "baseline_logloss": single["served_baseline_logloss"], "auc": single["served_auc"],
        "calibration": single["served_calibration"], "drift_alarms": alarms, "drift_alarms_total": raised,
        "events_total": events, "events_per_s": (events - previous["events_total"]) / max(seconds, 1e-3),
        "anomalies_total": anomalies, "anomalies": int(anomalies - previous["anomalies_total"]),
        "flagged_total": flagged, "flagged_examples": int(flagged - previous["flagged_total"]),
        "served_rmse": _labelled(serving, "streamrec_served_rmse", "kind").get("click", float("nan")),
        "prequential_rmse": _labelled(learner, "streamrec_prequential_rmse", "kind").get("click", float("nan")),
        "psi": {k: v for k, v in _labelled(serving, "streamrec_drift_psi", "signal").items() if v == v},
        "concept_drift": _labelled(serving, "streamrec_concept_drift_statistic", "signal"),
        "model_version": versions[0] if versions else "none",
    }


def _has(samples: dict, name: str) -> bool:
    return any(sample == name for sample, _ in samples)


def _print_row(r: dict) -> None:
    alarms = ",".join(r["drift_alarms"]) or "-"
    print(f"{r['step']:>4} {r['phase']:<7} {r['events_per_s']:>8.0f} {r['ctr']:>6.3f} {r['ctr_oracle']:>6.3f} "
          f"{r['ctr_popularity']:>7.3f} {r['served_rmse']:>6.3f} {r['baseline_rmse']:>6.3f} {r['calibration']:>5.2f} "
          f"{r['anomalies_total']:>9.0f} {alarms:<18} {r['model_version']}", flush=True)


CONCEPT_DRIFT_SIGNALS = ("loss_click", "loss_rating")


def _mean(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r[key] == r[key]]  # NaN before the first outcomes
    return sum(values) / len(values) if values else None


def quality_checks(rows: list[dict], schedule: Schedule) -> dict:
    """The figures the demo's targets are read from (``summary.json`` ``checks``): steady-phase means
    of the served click quality and its baseline, steps of the steady phase with any drift alarm,
    steps from the start of the preference shift to the first concept-drift alarm, and the oracle's
    and the popularity policy's CTR on the same requests."""
    steady = [r for r in rows if r["phase"] == "steady"]
    shift_start = schedule.start("shift")
    delay = next((r["step"] - shift_start for r in rows if r["step"] >= shift_start
                  and any(s in CONCEPT_DRIFT_SIGNALS for s in r["drift_alarms"])), None)
    return {
        "served_rmse_click": _mean(steady, "served_rmse"), "baseline_rmse_click": _mean(steady, "baseline_rmse"),
        "served_logloss_click": _mean(steady, "logloss"), "baseline_logloss_click": _mean(steady, "baseline_logloss"),
        "calibration_click": _mean(steady, "calibration"),
        "drift_alarm_steps_steady": sum(bool(r["drift_alarms"]) for r in steady),
        "concept_drift_alarm_delay_steps": delay,
        "ctr_oracle": _mean(steady, "ctr_oracle"), "ctr_popularity": _mean(steady, "ctr_popularity"),
    }


def _ab_comparison(run: Path, ab_samples: dict) -> dict:
    """The steady phase's A/B test from the log (``serving.ab_log``), with the requests the A/B
    replica answered per variant; ``{"error": ...}`` when there is nothing to compare."""
    slates, _ = slates_from_log(run / "log", attribution_window_s=ATTRIBUTION_WINDOW_S)
    try:
        result = compare_variants(slates, "control") if not slates.empty else {
            "error": "no logged impression names a variant"}
    except ValueError as err:  # a variant with no slate
        result = {"error": str(err)}
    result["requests"] = _labelled(ab_samples, "streamrec_variant_requests_total", "variant")
    return result


def ab_checks(ab: dict) -> dict:
    """``summary.json`` ``checks`` of the A/B test: the model's relative CTR lift over the popularity
    control and its 95% interval (a pair), None without a comparison."""
    comparison = next(iter(ab.get("comparisons", [])), None)
    if comparison is None or comparison["lift"] is None:
        return {"ab_lift": None, "ab_lift_ci": None}
    return {"ab_lift": comparison["lift"], "ab_lift_ci": comparison["lift_ci"]}


def _bias_comparison(quick: bool) -> dict | None:
    """``sim.bias`` (the experiment of ``bench.bias``) in one seed: raw clicks vs IPS, same simulation (skipped if it fails)."""
    from sim.bias import BiasConfig, obd_position_curves, run, summarize

    print("display-bias comparison (bench.bias, one seed) ...", flush=True)
    try:
        result = summarize([run(BiasConfig(seed=0), progress=False)])
        result.update(obd_position_curves(SHARED_DATA / "obd"))
        return result
    except Exception as err:  # the report says so rather than losing the run's own results
        log.warning("display-bias comparison failed: %s", err)
        return {"error": str(err)}


def _summary(rows: list[dict], samples: dict, bias: dict | None) -> dict:
    def mean_ctr(phase: str) -> float:
        values = [r["ctr"] for r in rows if r["phase"] == phase]
        return sum(values) / len(values) if values else float("nan")

    signals = sorted({s for r in rows for s in r["psi"]})
    figures = {
        "CTR warm-up": f"{mean_ctr('warmup'):.4f}", "CTR steady": f"{mean_ctr('steady'):.4f}",
        "CTR attack (normal users)": f"{mean_ctr('attack'):.4f}", "CTR after shift": f"{mean_ctr('shift'):.4f}",
        "served RMSE (end)": f"{rows[-1]['served_rmse']:.4f}",
        "anomaly records": int(rows[-1]["anomalies_total"]),
        "examples flagged anomalous": int(rows[-1]["flagged_total"]),
        "max PSI after shift": f"{max((max(r['psi'].values(), default=0) for r in rows if r['phase'] == 'shift'), default=0):.3f}",
        "model version (end)": rows[-1]["model_version"],
    }
    return {"figures": figures, "psi_signals": signals, "ctr": {p: mean_ctr(p) for p in ("warmup", "steady", "attack", "shift")}}


def _print_log_summary(run: Path, worker: dict) -> None:
    event_log = DeltaLog(run / "log")
    obp_csv = run / "obp_export.csv"
    rows = export_obp(run / "log", obp_csv)
    print("\n== what the stream logged ==")
    print("events by type:  ", _labelled(worker, "streamrec_events_total", "type"))
    print("duplicates:      ", int(total(worker, "streamrec_duplicates_total")))
    print("dead letters:    ", _labelled(worker, "streamrec_dlq_total", "reason"))
    print("examples:        ", {f"{dict(l).get('kind')}/{dict(l).get('label')}": v for (n, l), v in worker.items()
                                if n == "streamrec_examples_total"})
    print("unjoined clicks: ", _labelled(worker, "streamrec_unjoined_clicks_total", "reason"))
    print(f"Delta log:        {run / 'log'} ({event_log.data_files(EVENTS)} event files, "
          f"{event_log.data_files(EXAMPLES)} example files)")
    print(f"OBP export:       {obp_csv} ({rows} logged impressions with position, click, propensity)")
