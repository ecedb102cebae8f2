"""A replica running A/B variants, in process over loopback HTTP (no broker): every response names the
user's variant, the variant picks the model, the policy or the popularity ranking, the requests
are counted per variant, and a pinned store version that is missing stops the start."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

from learner.updates import write_snapshot
from serving.variants import Assignment, VariantError, parse_variants
from tests.unit.test_serving_api import first_model, get, model_rows, replica

KNOWN = [f"u{j}" for j in range(50)]
UNKNOWN = [f"x{j}" for j in range(20)]


def ab_replica(tmp_path, variants: list[str], model=None):
    return replica(tmp_path, model, Assignment(parse_variants(variants), salt="test"))


def pinned_store(tmp_path):
    """A store holding snapshot mf-1 and a live model mf-2 with other factors."""
    write_snapshot(tmp_path, "mf", 1, 3.5, -1.0, *model_rows(seed=1))
    return first_model(*model_rows(), seq=2)


def test_each_user_gets_the_variant_the_hash_assigns_with_its_source_and_policy(tmp_path):
    async def body():
        async with ab_replica(tmp_path, ["model=live/greedy:1", "control=popularity/greedy:1"],
                              first_model(*model_rows())) as (app, session):
            hits = ["i42"] * 30 + ["i7"] * 20 + ["i99"] * 10
            app.monitor.observe([{"user_id": f"y{j}", "item_id": item, "label": 1.0, "kind": "click", "ts": 0.0,
                                  "anomalous": False} for j, item in enumerate(hits)])
            served = {"model": 0, "control": 0}
            for user in KNOWN + UNKNOWN:
                status, data = await get(session, "/recommendations", user_id=user, k="3", policy="softmax")
                assert status == 200
                variant = app.variants.assign(user).name
                assert data["variant"] == variant and data["policy"] == "greedy"  # the variant's policy
                served[variant] += 1
                items = [it["item_id"] for it in data["items"]]
                expected = app.live.current.predict(user, items, "rating")
                np.testing.assert_allclose([it["score"] for it in data["items"]], expected, rtol=1e-5)
                if variant == "control":
                    assert items == ["i42", "i7", "i99"] and data["fallback"] is False
                else:
                    assert data["fallback"] is (user in UNKNOWN)
                    if user in KNOWN:
                        assert items != ["i42", "i7", "i99"]
            assert min(served.values()) > 20  # both variants got users
            for variant, n in served.items():
                count = app.metrics.registry.get_sample_value("streamrec_variant_requests_total", {"variant": variant})
                assert count == n
    asyncio.run(body())


def test_a_pinned_store_version_serves_its_users_beside_the_live_model(tmp_path):
    async def body():
        async with ab_replica(tmp_path, ["old=mf-1:1", "new=live:1"], pinned_store(tmp_path)) as (app, session):
            versions = set()
            for user in KNOWN:
                _, data = await get(session, "/recommendations", user_id=user, k="5")
                expected_version = "mf-1" if data["variant"] == "old" else "mf-2"
                assert data["model_version"] == expected_version
                versions.add(expected_version)
                model = app.pinned["mf-1"] if data["variant"] == "old" else app.live.current
                items = [it["item_id"] for it in data["items"]]
                np.testing.assert_allclose([it["score"] for it in data["items"]], model.predict(user, items, "rating"),
                                           rtol=1e-5)
            assert versions == {"mf-1", "mf-2"}
    asyncio.run(body())


def test_a_pinned_version_missing_from_the_store_stops_the_start_saying_what_is_there(tmp_path):
    write_snapshot(tmp_path, "mf", 3, 3.5, -1.0, *model_rows())

    async def body():
        with pytest.raises(VariantError, match=r"no snapshot 'mf-12' of model 'mf' .* \(snapshots there: mf-3\)"):
            async with ab_replica(tmp_path, ["old=mf-12:1", "new=live:1"]):
                pass
    asyncio.run(body())


def test_without_variants_the_response_has_no_variant(tmp_path):
    async def body():
        async with replica(tmp_path, first_model(*model_rows())) as (_, session):
            _, data = await get(session, "/recommendations", user_id="u1", k="2")
            assert "variant" not in data
    asyncio.run(body())


def test_the_monitor_scores_a_pinned_variants_outcomes_with_its_version_and_labels_them(tmp_path):
    async def body():
        async with ab_replica(tmp_path, ["old=mf-1:1", "new=live:1"], pinned_store(tmp_path)) as (app, _):
            outcomes = [{"user_id": u, "item_id": "i3", "label": float(j % 4 == 0), "kind": "click", "ts": 0.0,
                         "anomalous": False, "position": 1, "model_version": "mf-1", "variant": "old"}
                        for j, u in enumerate(KNOWN)]
            app.monitor.observe(outcomes)
            registry = app.metrics.registry
            assert registry.get_sample_value("streamrec_serving_examples_total", {"result": "served_version"}) == 50
            assert registry.get_sample_value("streamrec_variant_outcomes_total", {"variant": "old"}) == 50
            assert registry.get_sample_value("streamrec_variant_served_ctr", {"variant": "old"}) == pytest.approx(13 / 50)
            assert registry.get_sample_value("streamrec_variant_outcomes_total", {"variant": "new"}) == 0
    asyncio.run(body())
