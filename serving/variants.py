"""A/B variants: which model and policy serve a user, chosen by a stable hash of the user id.

``streamrec serve --variant NAME=SOURCE[/POLICY]:WEIGHT`` (repeated) splits the users of a replica
between variants. ``SOURCE`` is ``live`` (the live model, following ``model.updates``), a model
store version (``mf-12``: that snapshot, pinned, never updated) or ``popularity`` (the recent
popularity counts of ``serving.popularity``, the baseline a model must beat). ``POLICY`` is one of
``serving.policies.POLICIES`` and replaces the policy the request asks for; without it the
request's policy runs. ``WEIGHT`` is relative (``a=live:3 b=popularity:1`` gives b a quarter).

A user's variant is ``blake2b(user_id, key=salt)`` (64 bits) placed on the cumulative weights, so
every replica, before and after a restart, sends the user to the same variant, and users are
assigned independently of one another with the configured probabilities. Changing the salt
(``--variant-salt``) draws a fresh, independent assignment for a new experiment. Python's
``hash`` would not do: it is salted per process.

>>> variants = parse_variants(["model=live/epsilon_greedy:1", "control=popularity:1"])
>>> assignment = Assignment(variants, salt="exp-1")
>>> assignment.assign("u42").name == Assignment(variants, salt="exp-1").assign("u42").name
True
>>> parse_variant("b=live/best:1")
Traceback (most recent call last):
...
serving.variants.VariantError: --variant 'b=live/best:1': policy must be one of greedy, epsilon_greedy, softmax, got 'best'
"""
from __future__ import annotations

import bisect
import hashlib
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

LIVE = "live"
POPULARITY = "popularity"
MAX_VARIANTS = 16  # variants are Prometheus label values: few, and fixed by the configuration
MAX_SALT_BYTES = 64  # blake2b's key
DEFAULT_SALT = "streamrec-ab"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,255}")
SYNTAX = "NAME=SOURCE[/POLICY]:WEIGHT"


class VariantError(ValueError):
    """A ``--variant`` that cannot run; the message names the flag and what is wrong."""


@dataclass(frozen=True)
class Variant:
    """One arm of an A/B test.

    Parameters:
        name: how responses, impressions and metrics name it.
        source: ``live``, ``popularity`` or a model store version.
        policy: the policy it serves with (None: the request's).
        weight: its relative share of the users.
    """

    name: str
    source: str
    policy: str | None
    weight: float

    @property
    def pinned(self) -> bool:
        """Whether the source is a fixed model store version."""
        return self.source not in (LIVE, POPULARITY)


def parse_variant(text: str) -> Variant:
    """One ``--variant`` value (``NAME=SOURCE[/POLICY]:WEIGHT``); VariantError says what is wrong."""
    from serving.policies import POLICIES  # here, not at the top: ``serve --help`` stays free of numpy

    def fail(why: str) -> VariantError:
        return VariantError(f"--variant {text!r}: {why}")

    name, eq, rest = text.partition("=")
    spec, colon, weight_text = rest.rpartition(":")
    if not eq or not colon:
        raise fail(f"expected {SYNTAX}, e.g. model=live/epsilon_greedy:1 or control=popularity:1")
    if not _NAME.fullmatch(name):
        raise fail(f"name must be 1..64 letters, digits, '_', '.' or '-' (starting with a letter or digit), "
                   f"got {name!r}")
    source, slash, policy = spec.partition("/")
    if source not in (LIVE, POPULARITY) and not _VERSION.fullmatch(source):
        raise fail(f"source must be {LIVE}, {POPULARITY} or a model store version such as mf-12, got {source!r}")
    if slash and policy not in POLICIES:
        raise fail(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    try:
        weight = float(weight_text)
    except ValueError:
        raise fail(f"weight must be a positive number, got {weight_text!r}") from None
    if not (math.isfinite(weight) and weight > 0):
        raise fail(f"weight must be a positive number, got {weight_text!r}")
    return Variant(name, source, policy if slash else None, weight)


def parse_variants(texts: Iterable[str]) -> list[Variant]:
    """Every ``--variant`` value, checked together (unique names, at most ``MAX_VARIANTS``)."""
    variants = [parse_variant(text) for text in texts]
    if len(variants) > MAX_VARIANTS:
        raise VariantError(f"--variant: at most {MAX_VARIANTS} variants, got {len(variants)}")
    names = [v.name for v in variants]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise VariantError(f"--variant: each name once; repeated: {', '.join(repeated)}")
    return variants


def check_salt(salt: str) -> bytes:
    """The salt as blake2b's key; VariantError unless it is 1..64 bytes of UTF-8."""
    key = salt.encode("utf-8", "surrogatepass")
    if not 0 < len(key) <= MAX_SALT_BYTES:
        raise VariantError(f"--variant-salt must be 1..{MAX_SALT_BYTES} bytes, got {len(key)}")
    return key


class Assignment:
    """Users to variants by a keyed hash of ``user_id`` (module docstring).

    A user falls in variant $v$ when $h(u) / 2^{64} \\in [W_{v-1}, W_v)$, with $h$ the 64-bit
    keyed blake2b of the user id and $W_v$ the cumulative share of the weights up to $v$.

    Parameters:
        variants: the arms, in the order their shares are laid out.
        salt: the hash key; one salt per experiment.
    """

    def __init__(self, variants: Sequence[Variant], salt: str = DEFAULT_SALT) -> None:
        if not variants:
            raise VariantError("an assignment needs at least one variant")
        self.variants = tuple(variants)
        self.salt = salt
        self._key = check_salt(salt)
        total = sum(v.weight for v in variants)
        cumulative, bounds = 0.0, []
        for v in variants[:-1]:
            cumulative += v.weight
            bounds.append(int(cumulative / total * 2.0 ** 64))
        self._bounds = bounds  # the last variant takes everything above the last bound

    @property
    def names(self) -> list[str]:
        return [v.name for v in self.variants]

    def bucket(self, user_id: str) -> int:
        """The user's 64-bit hash."""
        digest = hashlib.blake2b(user_id.encode("utf-8", "surrogatepass"), digest_size=8, key=self._key).digest()
        return int.from_bytes(digest, "big")

    def assign(self, user_id: str) -> Variant:
        """The variant that serves ``user_id``."""
        return self.variants[bisect.bisect_right(self._bounds, self.bucket(user_id))]


def snapshot_folder(store_dir: Path, model: str, version: str) -> Path:
    """Where a pinned version's snapshot lies; VariantError, listing what there is, when it is missing."""
    folder = Path(store_dir) / model / version
    if (folder / "manifest.json").is_file():
        return folder
    base = Path(store_dir) / model
    found = sorted(p.parent.name for p in base.glob("*/manifest.json") if not p.parent.name.startswith(".")) \
        if base.is_dir() else []
    raise VariantError(f"--variant: no snapshot {version!r} of model {model!r} in {store_dir} "
                       f"(snapshots there: {', '.join(found) or 'none'})")
