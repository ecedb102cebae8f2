"""Compiled hot loops of the Random Cut Forest (numba), over flat per-tree arrays.

Why compiled: scoring and updating a point walks one root-to-leaf path per tree (depth ~12 for
256 points), a chain of dependent branches that vectorises poorly across trees (every tree takes
its own path) but compiles to tight loops.
Why one tree per outer iteration: the trees are independent (each has its own sampler and random
stream), so a batch of points runs tree by tree, which keeps a tree's arrays hot in cache, needs
one call per batch, and makes the result independent of the order in which the trees run.
Why single-threaded: stream workers scale out as processes (one per partition set), so a thread
pool per worker would only oversubscribe the cores. ``error_model="numpy"`` drops numba's
zero-division checks from the loops (no division here can be by zero).
Measurements behind these choices: docs/anomaly.md.

State of a forest of ``T`` trees with sample size ``S`` in ``D`` dimensions (one row per tree):

* nodes ``0 .. S-1`` are leaves (one distinct sampled point each, ``mass`` = its multiplicity),
  nodes ``S .. 2S-1`` are internal (at most S-1 in use); ``lo``/``hi`` (T, 2S, D) hold every node's bounding box (a
  leaf's box is its point), ``mass`` (T, 2S) the number of sampled points below a node,
  ``parent``/``left``/``right`` (T, 2S) the links (-1: none), ``cut_dim``/``cut_val`` (T, 2S) the
  cut of an internal node: a point goes left when ``x[cut_dim] <= cut_val``;
* ``root`` (T,) (-1: empty tree); free-node stacks ``free_leaf``/``free_int`` (T, S) with their
  sizes ``n_free`` (T, 2): column 0 leaves, column 1 internal nodes;
* the sampler: ``heap_weight``/``heap_leaf`` (T, S), a max-heap of the sampled points' weights
  and the leaf each sits in (the root, the heaviest, is the next to be evicted), and their
  number ``n_sampled`` (T,);
* ``rng`` (T,) uint64: one splitmix64 state per tree, so results depend only on the seed.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_S30 = np.uint64(30)
_S27 = np.uint64(27)
_S31 = np.uint64(31)
_S11 = np.uint64(11)
_TWO_M53 = 1.0 / 9007199254740992.0


@njit(cache=True, inline="always", error_model="numpy")
def _uniform(rng, t):
    """Next double in (0, 1) from tree ``t``'s splitmix64 stream."""
    s = rng[t] + _GOLDEN
    rng[t] = s
    z = (s ^ (s >> _S30)) * _MIX1
    z = (z ^ (z >> _S27)) * _MIX2
    z = z ^ (z >> _S31)
    return ((z >> _S11) + 0.5) * _TWO_M53


@njit(cache=True, error_model="numpy")
def tree_score(t, x, n_leaves, root, lo, hi, mass, left, right, cut_dim, cut_val, contrib):
    """Expected collusive displacement of inserting ``x`` into tree ``t`` (the tree is not changed).

    Walking from the root, a random cut of the box of node v grown to hold x separates x from v's
    points with probability q_v = (growth of the box) / (sum of the grown box's sides); if it
    does, x becomes v's sibling and displaces mass(v) points, and the collusive displacement is
    max(mass(v), max over the new ancestors u of |sibling(u)| / |u|). The sum over the path,
    weighted by the chance of reaching v unseparated, is the exact expectation of rrcf's CoDisp
    of x over the insertion's randomness. When ``contrib`` has D entries, each dimension's share
    of the separation probability is added to it (a duplicate's share is split evenly).
    """
    node = root[t]
    if node < 0:
        return 0.0
    dims = x.shape[0]
    attribute = contrib.shape[0] > 0
    reach = 1.0
    total = 0.0
    max_ratio = 0.0
    sibling_mass = -1
    while True:
        m = mass[t, node]
        if sibling_mass >= 0:
            ratio = sibling_mass / (m + 1.0)
            if ratio > max_ratio:
                max_ratio = ratio
        if node < n_leaves:
            span = 0.0
            for d in range(dims):
                span += abs(x[d] - lo[t, node, d])
            if span == 0.0:
                total += reach * max_ratio
                if attribute:
                    for d in range(dims):
                        contrib[d] += reach * max_ratio / dims
            else:
                disp = max(float(m), max_ratio)
                total += reach * disp
                if attribute:
                    for d in range(dims):
                        contrib[d] += reach * disp * abs(x[d] - lo[t, node, d]) / span
            return total
        gap = 0.0
        span = 0.0
        for d in range(dims):
            a = lo[t, node, d]
            b = hi[t, node, d]
            v = x[d]
            g = max(a - v, 0.0) + max(v - b, 0.0)
            gap += g
            span += b - a + g
        if gap > 0.0:
            disp = max(float(m), max_ratio)
            total += reach * disp * gap / span
            if attribute:
                for d in range(dims):
                    a = lo[t, node, d]
                    b = hi[t, node, d]
                    v = x[d]
                    g = max(a - v, 0.0) + max(v - b, 0.0)
                    contrib[d] += reach * disp * g / span
            reach *= 1.0 - gap / span
        if x[cut_dim[t, node]] <= cut_val[t, node]:
            sibling_mass = mass[t, right[t, node]]
            node = left[t, node]
        else:
            sibling_mass = mass[t, left[t, node]]
            node = right[t, node]


@njit(cache=True, error_model="numpy")
def _replace_child(t, old, new, root, parent, left, right):
    """Put ``new`` where ``old`` hangs (a child of old's parent, or the root)."""
    p = parent[t, old]
    parent[t, new] = p
    if p < 0:
        root[t] = new
    elif left[t, p] == old:
        left[t, p] = new
    else:
        right[t, p] = new


@njit(cache=True, error_model="numpy")
def tree_insert(t, x, n_leaves, root, lo, hi, mass, parent, left, right, cut_dim, cut_val,
                free_leaf, free_int, n_free, rng):
    """Insert ``x`` into tree ``t`` (Guha et al. 2016, Alg. 3); returns the leaf that holds it."""
    dims = x.shape[0]
    node = root[t]
    if node < 0:
        n_free[t, 0] -= 1
        leaf = free_leaf[t, n_free[t, 0]]
        lo[t, leaf, :] = x
        hi[t, leaf, :] = x
        mass[t, leaf] = 1
        parent[t, leaf] = -1
        root[t] = leaf
        return leaf
    while True:
        if node < n_leaves:
            same = True
            for d in range(dims):
                if lo[t, node, d] != x[d]:
                    same = False
                    break
            if same:
                mass[t, node] += 1
                return node
        span = 0.0
        for d in range(dims):
            span += max(hi[t, node, d], x[d]) - min(lo[t, node, d], x[d])
        r = _uniform(rng, t) * span
        dim = 0
        for d in range(dims):
            side = max(hi[t, node, d], x[d]) - min(lo[t, node, d], x[d])
            if r < side or d == dims - 1:
                dim = d
                break
            r -= side
        low = min(lo[t, node, dim], x[dim])
        high = max(hi[t, node, dim], x[dim])
        cut = low + r
        if not cut < high:
            cut = low
        x_left = x[dim] <= cut < lo[t, node, dim]
        x_right = hi[t, node, dim] <= cut < x[dim]
        if x_left or x_right:
            n_free[t, 0] -= 1
            leaf = free_leaf[t, n_free[t, 0]]
            n_free[t, 1] -= 1
            new = free_int[t, n_free[t, 1]]
            lo[t, leaf, :] = x
            hi[t, leaf, :] = x
            mass[t, leaf] = 1
            for d in range(dims):
                lo[t, new, d] = min(lo[t, node, d], x[d])
                hi[t, new, d] = max(hi[t, node, d], x[d])
            mass[t, new] = mass[t, node] + 1
            cut_dim[t, new] = dim
            cut_val[t, new] = cut
            _replace_child(t, node, new, root, parent, left, right)
            parent[t, node] = new
            parent[t, leaf] = new
            if x_left:
                left[t, new] = leaf
                right[t, new] = node
            else:
                left[t, new] = node
                right[t, new] = leaf
            return leaf
        mass[t, node] += 1
        for d in range(dims):
            lo[t, node, d] = min(lo[t, node, d], x[d])
            hi[t, node, d] = max(hi[t, node, d], x[d])
        node = left[t, node] if x[cut_dim[t, node]] <= cut_val[t, node] else right[t, node]


@njit(cache=True, error_model="numpy")
def tree_remove(t, leaf, root, lo, hi, mass, parent, left, right, free_leaf, free_int, n_free):
    """Remove one copy of ``leaf``'s point from tree ``t`` (Guha et al. 2016, Alg. 2)."""
    node = leaf
    while node >= 0:
        mass[t, node] -= 1
        node = parent[t, node]
    if mass[t, leaf] > 0:
        return
    free_leaf[t, n_free[t, 0]] = leaf
    n_free[t, 0] += 1
    p = parent[t, leaf]
    if p < 0:
        root[t] = -1
        return
    sibling = right[t, p] if left[t, p] == leaf else left[t, p]
    _replace_child(t, p, sibling, root, parent, left, right)
    free_int[t, n_free[t, 1]] = p
    n_free[t, 1] += 1
    node = parent[t, sibling]
    dims = lo.shape[2]
    while node >= 0:
        a = left[t, node]
        b = right[t, node]
        changed = False
        for d in range(dims):
            low = min(lo[t, a, d], lo[t, b, d])
            high = max(hi[t, a, d], hi[t, b, d])
            if low != lo[t, node, d] or high != hi[t, node, d]:
                lo[t, node, d] = low
                hi[t, node, d] = high
                changed = True
        if not changed:
            return
        node = parent[t, node]


@njit(cache=True, error_model="numpy")
def _add_sample(t, x, weight, root, lo, hi, mass, parent, left, right, cut_dim, cut_val,
                free_leaf, free_int, n_free, heap_weight, heap_leaf, n_sampled, rng):
    """Put ``x`` with sampler ``weight`` into tree ``t``'s sample, evicting the heaviest if full.

    The sample is a binary max-heap on weight (``heap_weight[t, 0]`` is the next to go).
    """
    n_leaves = heap_weight.shape[1]
    if n_sampled[t] == n_leaves:
        tree_remove(t, heap_leaf[t, 0], root, lo, hi, mass, parent, left, right,
                    free_leaf, free_int, n_free)
    leaf = tree_insert(t, x, n_leaves, root, lo, hi, mass, parent, left, right, cut_dim, cut_val,
                       free_leaf, free_int, n_free, rng)
    if n_sampled[t] < n_leaves:
        i = n_sampled[t]
        n_sampled[t] += 1
        while i > 0 and heap_weight[t, (i - 1) // 2] < weight:
            heap_weight[t, i] = heap_weight[t, (i - 1) // 2]
            heap_leaf[t, i] = heap_leaf[t, (i - 1) // 2]
            i = (i - 1) // 2
    else:
        i = 0
        while True:
            child = 2 * i + 1
            if child >= n_leaves:
                break
            if child + 1 < n_leaves and heap_weight[t, child + 1] > heap_weight[t, child]:
                child += 1
            if heap_weight[t, child] <= weight:
                break
            heap_weight[t, i] = heap_weight[t, child]
            heap_leaf[t, i] = heap_leaf[t, child]
            i = child
    heap_weight[t, i] = weight
    heap_leaf[t, i] = leaf


@njit(cache=True, error_model="numpy")
def forest_pass(points, seq0, decay, do_score, do_update, root, lo, hi, mass, parent, left, right,
                cut_dim, cut_val, free_leaf, free_int, n_free, heap_weight, heap_leaf, n_sampled,
                rng, out):
    """For each tree, then each point in order: score it into ``out[t, i]`` (if ``do_score``),
    then offer it to the tree's sampler as the ``seq0 + i``-th point (if ``do_update``).

    The sampler is AWS's: a point gets weight -decay * seq + log(-log(u)), u ~ U(0, 1), and each
    tree keeps the S points of smallest weight, a weighted reservoir sample with weights growing
    as exp(decay * seq) (decay = 0: uniform over all history). Most points are rejected, so the
    acceptance test runs here, before any call.
    """
    n_leaves = heap_weight.shape[1]
    no_contrib = np.empty(0)
    for t in range(root.shape[0]):
        for i in range(points.shape[0]):
            x = points[i]
            if do_score:
                out[t, i] = tree_score(t, x, n_leaves, root, lo, hi, mass, left, right,
                                       cut_dim, cut_val, no_contrib)
            if do_update:
                weight = -decay * (seq0 + i) + math.log(-math.log(_uniform(rng, t)))
                if n_sampled[t] < n_leaves or weight < heap_weight[t, 0]:
                    _add_sample(t, x, weight, root, lo, hi, mass, parent, left, right, cut_dim,
                                cut_val, free_leaf, free_int, n_free, heap_weight, heap_leaf,
                                n_sampled, rng)


@njit(cache=True, error_model="numpy")
def forest_attribution(x, root, lo, hi, mass, left, right, cut_dim, cut_val):
    """Per-dimension split of the forest's mean score of ``x`` (sums to the score)."""
    n_trees = root.shape[0]
    n_leaves = (lo.shape[1]) // 2
    contrib = np.zeros(x.shape[0])
    for t in range(n_trees):
        tree_score(t, x, n_leaves, root, lo, hi, mass, left, right, cut_dim, cut_val, contrib)
    return contrib / n_trees
