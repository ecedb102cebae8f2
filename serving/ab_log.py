"""The A/B comparison from the event log: slates per variant, CTR, lift and intervals, as a table or JSON.

``streamrec ab`` (``serving.ab_cli``) and the demo run it. It reads the log's ``events`` dataset
(``stream.log.table``): the impressions that name a ``variant`` (one row per shown item) and the
clicks, joined to them by ``request_id`` and item, within the attribution window of the
impression and counted once per shown item. Each user's
shown items and clicks go to their variant (a user belongs to one variant: ``serving.variants``),
and ``serving.ab`` computes the CTR per variant and the lift of each over the control, with
user-clustered delta-method intervals. Figures that do not exist (an interval of one user, a lift
over no clicks) are None in the JSON and "n/a" in the table.
"""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from serving.ab import CONFIDENCE, ArmData, arm_stats, compare
from stream.log.table import EVENTS, DeltaLog

_COLUMNS = ["type", "user_id", "ts", "request_id", "item_id", "variant"]


def slates_from_log(log_dir: str | Path, attribution_window_s: float) -> tuple[pd.DataFrame, int]:
    """One row per logged slate served by a variant (``request_id, user_id, variant, shown,
    clicks``), and the number of impressions that name no variant (served outside a test)."""
    events = DeltaLog(log_dir).read(EVENTS, columns=_COLUMNS)
    impressions = events[events["type"] == "impression"]
    in_test = impressions["variant"].notna()
    outside = int(impressions.loc[~in_test, "request_id"].nunique())
    shown = impressions[in_test].drop_duplicates(["request_id", "item_id"])
    if shown.empty:
        return pd.DataFrame(columns=["request_id", "user_id", "variant", "ts", "shown", "clicks"]), outside
    slates = shown.groupby("request_id", sort=False).agg(user_id=("user_id", "first"), variant=("variant", "first"),
                                                        ts=("ts", "min"), shown=("item_id", "size"))
    clicks = events[events["type"] == "click"][["request_id", "item_id", "ts"]]
    clicks = clicks.merge(shown[["request_id", "item_id"]], on=["request_id", "item_id"])  # shown items only
    clicks = clicks.join(slates["ts"].rename("shown_ts"), on="request_id")
    clicks = clicks[clicks["ts"] - clicks["shown_ts"] <= attribution_window_s].drop_duplicates(["request_id", "item_id"])
    slates["clicks"] = clicks.groupby("request_id").size().reindex(slates.index, fill_value=0)
    return slates.reset_index(), outside


def compare_variants(slates: pd.DataFrame, control: str, confidence: float = CONFIDENCE) -> dict:
    """The comparison as a JSON-ready dict: per variant users, slates, impressions, clicks and
    CTR with its interval; per non-control variant the lift over ``control`` with its interval."""
    names = sorted(slates["variant"].unique())
    if control not in names:
        raise ValueError(f"control variant {control!r} is not in the log; variants there: "
                         f"{', '.join(names) or 'none'}")
    per_user = slates.groupby(["variant", "user_id"]).agg(shown=("shown", "sum"), clicks=("clicks", "sum"),
                                                          slates=("request_id", "size"))
    arms = {}
    for name in names:
        users = per_user.loc[name]
        arms[name] = arm_stats(name, ArmData(users["shown"].to_numpy(), users["clicks"].to_numpy(),
                                             users["slates"].to_numpy()), confidence)
    lifts = [compare(arms[n], arms[control], confidence) for n in names if n != control]
    return {
        "control": control, "confidence": confidence, "unit": "user",
        "variants": [{"variant": a.name, "users": a.users, "slates": a.slates, "impressions": a.impressions,
                      "clicks": a.clicks, "ctr": _num(a.ctr), "ctr_ci": [_num(x) for x in a.ctr_ci]}
                     for a in arms.values()],
        "comparisons": [{"variant": lift.variant, "control": lift.control, "lift": _num(lift.lift),
                         "lift_ci": [_num(x) for x in lift.lift_ci], "ctr_diff": _num(lift.ctr_diff),
                         "ctr_diff_ci": [_num(x) for x in lift.ctr_diff_ci]} for lift in lifts],
    }


def _num(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x * 100:+.1f}%"


def _ctr(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def format_table(result: dict) -> str:
    """The comparison as a terminal table."""
    level = f"{result['confidence'] * 100:g}%"
    lifts = {c["variant"]: c for c in result["comparisons"]}
    lines = [f"CTR per shown item by A/B variant; {level} intervals clustered by user (delta method); "
             f"lift = CTR / CTR({result['control']}) - 1",
             f"{'variant':<20} {'users':>7} {'slates':>8} {'shown':>9} {'clicks':>7} {'CTR':>7} "
             f"{level + ' CI':>17}  {'lift':>8} {level + ' CI':>19}"]
    for v in result["variants"]:
        lo, hi = v["ctr_ci"]
        c = lifts.get(v["variant"])
        lift = "(control)" if c is None else _pct(c["lift"])
        lift_ci = "" if c is None else f"[{_pct(c['lift_ci'][0])}, {_pct(c['lift_ci'][1])}]"
        lines.append(f"{v['variant']:<20} {v['users']:>7} {v['slates']:>8} {v['impressions']:>9} {v['clicks']:>7} "
                     f"{_ctr(v['ctr']):>7} [{_ctr(lo):>7}, {_ctr(hi):>7}]  {lift:>8} {lift_ci:>19}")
    if result.get("outside_test"):
        lines.append(f"({result['outside_test']} slates served outside the test are left out)")
    return "\n".join(lines)
