"""A/B variants (issue 15, deliverable 4): the ``--variant`` flag, the stable assignment by user hash,
the variant in the event contract and the examples, and per-variant figures of the monitor."""
from __future__ import annotations

import doctest
import os
import subprocess
import sys

import numpy as np
import pytest

import serving.ab_monitor
import serving.variants
from serving.ab_monitor import VariantQuality
from serving.cli import add_arguments, variants_from_args
from serving.metrics import ServingMetrics
from serving.variants import MAX_VARIANTS, Assignment, Variant, VariantError, parse_variant, parse_variants
from stream.events import ValidationError, to_event, validate
from stream.examples import CLICKED, CLOSED, click_example, example_rows

USERS = [f"user-{j}" for j in range(40_000)]


def test_doctests():
    for module in (serving.variants, serving.ab_monitor):
        assert doctest.testmod(module).failed == 0


# -- the flag -------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, variant", [
    ("model=live/epsilon_greedy:1", Variant("model", "live", "epsilon_greedy", 1.0)),
    ("control=popularity:0.5", Variant("control", "popularity", None, 0.5)),
    ("old=mf-12/softmax:2", Variant("old", "mf-12", "softmax", 2.0)),
    ("a.b-c_9=live:1e-3", Variant("a.b-c_9", "live", None, 1e-3)),
])
def test_a_variant_parses_into_name_source_policy_and_weight(text, variant):
    assert parse_variant(text) == variant
    assert variant.pinned == (variant.source == "mf-12")


@pytest.mark.parametrize("text, message", [
    ("model", "expected NAME=SOURCE[/POLICY]:WEIGHT"),
    ("model=live", "expected NAME=SOURCE[/POLICY]:WEIGHT"),
    ("=live:1", "name must be"),
    ("bad name=live:1", "name must be"),
    ("x" * 65 + "=live:1", "name must be"),
    ("m=../models/x:1", "source must be live, popularity or a model store version"),
    ("m=:1", "source must be"),
    ("m=live/best:1", "policy must be one of greedy, epsilon_greedy, softmax, got 'best'"),
    ("m=live/:1", "policy must be one of"),
    ("m=live:0", "weight must be a positive number, got '0'"),
    ("m=live:-1", "weight must be a positive number"),
    ("m=live:nan", "weight must be a positive number"),
    ("m=live:inf", "weight must be a positive number"),
    ("m=live:half", "weight must be a positive number, got 'half'"),
])
def test_a_bad_variant_is_refused_naming_the_flag_and_the_part(text, message):
    with pytest.raises(VariantError) as err:
        parse_variant(text)
    assert str(err.value).startswith(f"--variant {text!r}: ") and message in str(err.value)


def test_the_set_of_variants_is_checked_together():
    with pytest.raises(VariantError, match="each name once; repeated: a"):
        parse_variants(["a=live:1", "b=popularity:1", "a=mf-3:1"])
    with pytest.raises(VariantError, match=f"at most {MAX_VARIANTS} variants"):
        parse_variants([f"v{j}=live:1" for j in range(MAX_VARIANTS + 1)])


def _serve_args(*argv):
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_the_serve_command_line_exits_with_the_message():
    assert variants_from_args(_serve_args()) is None
    assignment = variants_from_args(_serve_args("--variant", "a=live:1", "--variant", "b=popularity:3"))
    assert assignment.names == ["a", "b"]
    with pytest.raises(SystemExit, match="streamrec serve: --variant 'b=popularity': expected"):
        variants_from_args(_serve_args("--variant", "a=live:1", "--variant", "b=popularity"))
    with pytest.raises(SystemExit, match="--variant-salt must be 1..64 bytes, got 65"):
        variants_from_args(_serve_args("--variant", "a=live:1", "--variant-salt", "s" * 65))


# -- the assignment -------------------------------------------------------------------------------

VARIANTS = parse_variants(["a=live:1", "b=popularity:2", "c=mf-3:5"])


def test_assignment_is_the_same_in_another_instance_and_in_another_process():
    """Replicas and restarts: a fresh object, and a fresh interpreter with another hash seed."""
    here = [Assignment(VARIANTS, "exp").assign(u).name for u in USERS[:300]]
    assert here == [Assignment(VARIANTS, "exp").assign(u).name for u in USERS[:300]]
    code = ("from serving.variants import Assignment, parse_variants;"
            "v = parse_variants(['a=live:1', 'b=popularity:2', 'c=mf-3:5']);"
            f"print(''.join(Assignment(v, 'exp').assign(f'user-{{j}}').name for j in range(300)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONHASHSEED="12345")).stdout.strip()
    assert out == "".join(here)


def test_assignment_matches_the_weights():
    """Chi-square goodness of fit of 40,000 users to the shares 1/8, 2/8, 5/8 (2 degrees of
    freedom; 13.8 is the 0.999 quantile), and each share within 1 % of its weight."""
    counts = np.zeros(3)
    assignment = Assignment(VARIANTS, "exp")
    for user in USERS:
        counts["abc".index(assignment.assign(user).name)] += 1
    expected = np.array([1, 2, 5]) / 8 * len(USERS)
    assert float(((counts - expected) ** 2 / expected).sum()) < 13.8
    assert np.allclose(counts / len(USERS), [1 / 8, 2 / 8, 5 / 8], atol=0.01)


def test_a_new_salt_draws_an_independent_assignment():
    """Independent assignments agree on a user with probability sum(w_i^2) = 30/64."""
    first, second = Assignment(VARIANTS, "exp-1"), Assignment(VARIANTS, "exp-2")
    agree = np.mean([first.assign(u).name == second.assign(u).name for u in USERS[:20_000]])
    assert abs(agree - 30 / 64) < 0.015


def test_equal_weights_split_users_in_half():
    assignment = Assignment(parse_variants(["model=live:1", "control=popularity:1"]))
    share = np.mean([assignment.assign(u).name == "model" for u in USERS])
    assert abs(share - 0.5) < 0.01


# -- the event contract and the examples ----------------------------------------------------------

def impression(**extra):
    return {"event_id": "e1", "type": "impression", "schema_version": 1, "user_id": "u1", "ts": 1.7e9,
            "request_id": "r1", "model_version": "mf-1", "policy": "greedy",
            "items": [{"item_id": "a", "position": 1, "propensity": 1.0}], **extra}


@pytest.mark.parametrize("variant, reason, message", [
    ("", "invalid_value", "variant: must not be empty"),
    ("v" * 257, "invalid_value", "variant: has 257 characters, at most 256 allowed"),
    (7, "wrong_type", "variant: must be a string, got number"),
    (None, "wrong_type", "variant: must be a string, got null"),
])
def test_an_impression_variant_must_be_a_short_nonempty_string(variant, reason, message):
    problems = validate(impression(variant=variant), now=1.7e9)
    assert [(p.path, p.reason, p.message) for p in problems] == [("variant", reason, message)]


def test_an_impression_may_carry_a_variant_and_its_examples_carry_it_on():
    assert validate(impression(variant="model"), now=1.7e9) == []
    assert validate(impression(), now=1.7e9) == []
    imp = to_event(impression(variant="model", items=[{"item_id": "a", "position": 1, "propensity": 1.0},
                                                      {"item_id": "b", "position": 2, "propensity": 0.5}]))
    example = click_example(imp, imp.items, CLOSED, ts=imp.ts, event_id=imp.event_id, max_weight=50.0)
    assert example.variant == "model"
    assert example_rows([example]).column("variant").to_pylist() == ["model", "model"]  # on every item's row
    plain = to_event(impression())
    example = click_example(plain, plain.items, CLICKED, ts=1.7e9, event_id="c1", max_weight=50.0)
    assert example.variant is None
    assert example_rows([example]).column("variant").to_pylist() == [None]


def test_the_impression_builder_sets_the_variant_only_when_given():
    from stream import events

    items = [{"item_id": "a", "position": 1, "propensity": 1.0}]
    assert events.impression("u", "r", "mf-1", "greedy", items, variant="control")["variant"] == "control"
    assert "variant" not in events.impression("u", "r", "mf-1", "greedy", items)
    with pytest.raises(ValidationError, match="variant: must not be empty"):
        events.encode(events.impression("u", "r", "mf-1", "greedy", items, variant=""))


# -- per-variant figures --------------------------------------------------------------------------

def test_variant_figures_follow_each_variant_and_ignore_unconfigured_names():
    metrics = ServingMetrics()
    metrics.track_variants(["model", "control"])
    quality = VariantQuality(["model", "control"], metrics, window=1000)
    rng = np.random.default_rng(0)
    n = 4000
    variants = rng.choice(np.array(["model", "control", "other", None], dtype=object), size=n)
    ctr = np.where(variants == "model", 0.2, 0.1)
    labels = (rng.random(n) < ctr).astype(float)
    quality.add(list(variants), ctr, labels)

    def sample(name, variant):
        return metrics.registry.get_sample_value(name, {"variant": variant})

    assert sample("streamrec_variant_outcomes_total", "model") == float((variants == "model").sum())
    assert abs(sample("streamrec_variant_served_ctr", "model") - 0.2) < 0.04
    assert abs(sample("streamrec_variant_served_ctr", "control") - 0.1) < 0.03
    assert 0.8 < sample("streamrec_variant_served_calibration", "model") < 1.25
    assert sample("streamrec_variant_served_ctr", "other") is None
