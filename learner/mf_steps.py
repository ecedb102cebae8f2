r"""The training steps of :class:`learner.online_mf.OnlineMF`: one batch of ratings or of clicks.

Each step scores the batch before it learns it (prequential), changes the model's tables in
place and returns those scores. Gradients are written by hand (no autograd) and applied with
``index_add_``, so duplicate rows inside a batch add up correctly. The rating step is written
twice, with the same updates in the same order: as tensor operations (:func:`rating_step_torch`,
the form that runs on CUDA) and as a compiled loop over numpy views of the same tables
(:func:`rating_step_compiled`, numba), which on CPU is several times faster than dispatching the
tensor operations of small batches. A test holds the two to the same scores and tables.

**Ratings.** With $\mathbf{x}_u = (\mathbf{p}_u, \ell_u, b_u)$ and
$\mathbf{z}_i = (\mathbf{q}_i, 1, 1)$, a rating with residual $r$ (label minus score) and weight
$w$ moves its user by the implicit (proximal) step

$$\mathbf{x}_u \leftarrow \arg\min_{\mathbf{x}}\; w\,(r - \mathbf{z}_i^\top(\mathbf{x} - \mathbf{x}_u))^2
+ (\lambda_u + \min(n_u, m))\,\lVert\mathbf{x} - \mathbf{x}_u\rVert^2,$$

that is $\mathbf{x}_u \leftarrow \mathbf{x}_u + a\,\mathbf{z}_i$ with
$a = w\,r / (\lambda_u + \min(n_u, m) + w\,\lVert\mathbf{z}_i\rVert^2)$, where $n_u$ is the
user's accumulated loss curvature (its weighted example count for ratings), $\lambda_u$ =
``user_prior`` and $m$ = ``user_memory``: early examples move a user fast, and the step never
drops below about $1/(\lambda_u + m)$, so the user keeps tracking drift. Then
$b_u \leftarrow \rho\, b_u$ with $\rho$ = ``bias_decay``: the level $\ell_u$ keeps its share of
each step while the transient bias $b_u$ fades over the user's next few ratings.

The implicit item factors learn by SGD on the same squared loss, rate $\eta$ = ``implicit_lr``: a
rating of item $i$ by $u$ with residual $r$ moves the $\mathbf{y}_j$ of the user's earlier items
by $\eta\, w\, r\, |N(u)|^{-1/2}\, \mathbf{q}_i$. Only the user's last $L$ = ``implicit_window``
items receive it, and the steps are applied at the end of the batch ($\mathbf{y}$ is read only
when an item enters a user's sum). $\mathbf{s}_u$ is a running sum: it gains $\mathbf{y}_i$ when
the user's rating of $i$ is learned, and its own items' steps at once ($\min(|N(u)|, L)$ times the
step above), but not the later changes other users make to those $\mathbf{y}_j$.

Within a batch the user steps, $\mathbf{s}_u$ and $\mu$ advance in stream order, so a batch scores
each example as if the examples before it had been learned one at a time (items and their
$\mathbf{y}$ excepted).

**Clicks** move a user's $\mathbf{p}_u$ and $c_u$ by one damped Gauss-Newton step per batch on
the same damping, so a user repeated many times in a batch cannot overshoot; they do not enter
$N(u)$. The click intercept $c$ takes Newton steps on its accumulated curvature.

**Items** change once per batch, with the batch's gradients summed per item, so an item repeated
many times in a batch takes one bounded step: biases take a Newton step on their prior
$\lambda_i$ = ``item_prior`` plus accumulated curvature (for ratings: the shrunk running mean of
residuals); embeddings take row-wise Adagrad with rate ``lr`` and L2 ``l2``, on the gradient
through $\mathbf{v}_u$.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
from numba import njit

if TYPE_CHECKING:
    from learner.online_mf import OnlineMF

# the tables the compiled rating step reads and writes, in the order of its arguments
KERNEL_TABLES = (
    "user_factors", "user_bias", "user_level", "user_rating_curvature", "user_implicit",
    "user_rated", "user_history", "item_factors", "item_bias", "item_rating_curvature",
    "item_factors_g2", "item_implicit",
)


def implicit_scale(rated: torch.Tensor) -> torch.Tensor:
    """$|N(u)|^{-1/2}$ from the users' rating counts (0 for a user with none)."""
    rated = rated.float()
    return torch.where(rated > 0, rated.clamp(min=1).rsqrt(), 0.0)


def user_vectors(tables: dict[str, torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
    """$\\mathbf{p}_u + |N(u)|^{-1/2} \\mathbf{s}_u$: the embedding a user scores with."""
    scale = implicit_scale(tables["user_rated"][rows]).unsqueeze(1)
    return tables["user_factors"][rows] + scale * tables["user_implicit"][rows]


def clip_ratings(score: torch.Tensor, rating_range: tuple[float, float] | None) -> torch.Tensor:
    """Rating scores clipped to ``rating_range`` (unchanged when it is None)."""
    return score.clamp(*rating_range) if rating_range is not None else score


def rating_step_compiled(model: OnlineMF, arrays: tuple[np.ndarray, ...], u_rows: np.ndarray,
                         i_rows: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The rating step on CPU: ``arrays`` are numpy views of the model's :data:`KERNEL_TABLES`."""
    score = np.empty(len(u_rows))
    low, high = model.rating_range or (-math.inf, math.inf)
    _rating_kernel(
        *arrays, u_rows, i_rows, labels, weights, model.rating_sum,
        model.n_examples["rating"], model.global_mean, model.user_prior, model.user_memory, model.bias_decay,
        model.implicit_lr, model.item_prior, model.lr, model.l2, low, high, score,
    )
    return score


def rating_step_torch(model: OnlineMF, u_rows: np.ndarray, i_rows: np.ndarray, labels: np.ndarray,
                      weights: np.ndarray) -> np.ndarray:
    r"""The rating step as tensor operations, with the user steps in stream order.

    The examples are grouped by user (stream order kept); $j$ is an example, $t < j$ the user's
    earlier examples in the batch, $k_j$ the number of them. Every in-batch change to the user's
    state is linear in the errors $e_t$ of the earlier examples, so the error each example is
    scored with solves one unit lower-triangular system, block-diagonal by user:
    $(I + K)\,\mathbf{e} = \mathbf{y} - \mathbf{s}^0$, with $\mathbf{s}^0$ the scores from the
    batch-start state (plus the implicit items added before $j$) and
    $K_{jt} = \frac{w_t}{D_t}\left(\mathbf{q}_j^\top\mathbf{q}_t + \rho^{k_j - k_t} + 1\right)
    + \eta\, w_t\, c_j c_t \min(n_t, L)\, \mathbf{q}_j^\top\mathbf{q}_t$ (see the module
    docstring for the symbols). Prefix sums within each user then give the state each example
    saw, which the item gradients use.
    """
    t = model.tables
    dev = model.device
    n, window, rho = len(u_rows), model.implicit_window, model.bias_decay
    _, inverse, counts = np.unique(u_rows, return_inverse=True, return_counts=True)
    order = np.argsort(inverse, kind="stable")  # grouped by user, stream order kept
    segment = inverse[order]
    first = np.r_[True, segment[1:] != segment[:-1]]
    starts = np.maximum.accumulate(np.where(first, np.arange(n), 0))
    o = torch.from_numpy(order).to(dev)
    start = torch.from_numpy(starts).to(dev)
    rank = torch.from_numpy(np.arange(n) - starts).to(dev)  # k_j
    in_batch = torch.from_numpy(counts[segment]).to(dev)  # the user's examples in the batch
    y = _tensor(labels, dev)[o]
    w = _tensor(weights, dev)[o]
    mean = _running_means(model, _tensor(labels, dev))[o]
    u = torch.from_numpy(u_rows).to(dev)[o]
    i = torch.from_numpy(i_rows).to(dev)[o]
    q, implicit_q = t["item_factors"][i], t["item_implicit"][i]
    rated = t["user_rated"][u] + rank  # n_j: the user's rating count before example j
    c = implicit_scale(rated)
    share = rated.clamp(max=window).float()
    curvature = t["user_rating_curvature"][u] + _segment_prefix(w.unsqueeze(1), start).squeeze(1)
    damping = model.user_prior + curvature.clamp(max=model.user_memory) + w * ((q * q).sum(1) + 2)
    implicit_before = t["user_implicit"][u] + _segment_prefix(implicit_q, start)
    score0 = (mean + t["user_bias"][u] * rho ** rank.float() + t["user_level"][u] + t["item_bias"][i]
              + (q * (t["user_factors"][u] + c.unsqueeze(1) * implicit_before)).sum(1))
    same = (start.unsqueeze(1) == start.unsqueeze(0)).tril_(-1)  # same user, earlier example
    gap = (rank.unsqueeze(1) - rank.unsqueeze(0)).clamp(min=0).float()
    qq = q @ q.T
    step = w / damping
    implicit = c.unsqueeze(1) * (model.implicit_lr * w * c * share).unsqueeze(0)
    system = torch.where(same, qq * (step.unsqueeze(0) + implicit)
                         + step.unsqueeze(0) * (rho ** gap + 1), 0.0)
    system.diagonal().fill_(1.0)
    error = torch.linalg.solve_triangular(system, (y - score0).unsqueeze(1), upper=False).squeeze(1)
    a = step * error  # the user step of each example
    g = (model.implicit_lr * w * error * c).unsqueeze(1) * q  # its implicit-feedback gradient
    implicit_at = implicit_before + _segment_prefix(share.unsqueeze(1) * g, start)
    user_vector = (t["user_factors"][u] + _segment_prefix(a.unsqueeze(1) * q, start)
                   + c.unsqueeze(1) * implicit_at)  # v_u as each example saw it
    descent = w * error
    # the user's state after the batch
    users = torch.from_numpy(np.unique(u_rows)).to(dev)
    t["user_factors"].index_add_(0, u, a.unsqueeze(1) * q)
    t["user_level"].index_add_(0, u, a)
    t["user_bias"][users] *= rho ** torch.from_numpy(counts).to(dev).float()
    t["user_bias"].index_add_(0, u, a * rho ** (in_batch - rank).float())
    t["user_implicit"].index_add_(0, u, share.unsqueeze(1) * g + implicit_q)
    t["user_rating_curvature"].index_add_(0, u, w)
    # implicit flush: each gradient reaches the user's items rated before it that are still
    # among its last `window` after the batch
    end = t["user_rated"][users] + torch.from_numpy(counts).to(dev)
    total = g.new_zeros((len(users), g.shape[1])).index_add_(0, torch.from_numpy(segment).to(dev), g)
    later = total[torch.from_numpy(segment).to(dev)] - _segment_prefix(g, start) - g
    kept = rank >= in_batch - window
    t["item_implicit"].index_add_(0, i[kept], later[kept])
    pos = end.unsqueeze(1) - window + torch.arange(window, device=dev)
    old = (pos >= 0) & (pos < t["user_rated"][users].unsqueeze(1))
    held = t["user_history"][users.unsqueeze(1), pos.clamp(min=0) % window].long()
    t["item_implicit"].index_add_(0, held[old], total.unsqueeze(1).expand(-1, window, -1)[old])
    t["user_history"][u[kept], rated[kept] % window] = i[kept].to(torch.int32)
    t["user_rated"].index_add_(0, u, torch.ones_like(u))
    _item_steps(model, i, "bias", t["item_rating_curvature"], descent, w,
                -descent.unsqueeze(1) * user_vector + model.l2 * q)
    score = torch.empty_like(error).index_copy_(0, o, y - error)
    return clip_ratings(score, model.rating_range).double().cpu().numpy()


def click_step(model: OnlineMF, u_rows: np.ndarray, i_rows: np.ndarray, targets: np.ndarray,
               weights: np.ndarray) -> np.ndarray:
    """The click step on the (IPS-corrected) ``targets``; also advances ``model.click_curvature``.
    Returns the click probabilities made before the step."""
    t = model.tables
    target, w = _tensor(targets, model.device), _tensor(weights, model.device)
    u, i = torch.from_numpy(u_rows).to(model.device), torch.from_numpy(i_rows).to(model.device)
    p, q = user_vectors(t, u), t["item_factors"][i]  # implicit part included, as served
    score = t["click_offset"] + t["user_click_bias"][u] + t["item_click_bias"][i] + (p * q).sum(1)
    prob = torch.sigmoid(score)
    descent = w * (target - prob)  # minus the logistic gradient with respect to the score
    curvature = w * prob * (1 - prob)
    # one damped Gauss-Newton step per user: the batch's gradients over its prior, capped
    # count and their curvature, so a user repeated many times in a batch cannot overshoot
    users, slot = torch.unique(u, return_inverse=True)
    z = torch.cat([q, torch.ones_like(descent).unsqueeze(1)], dim=1)
    push = z.new_zeros((len(users), z.shape[1])).index_add_(0, slot, descent.unsqueeze(1) * z)
    spread = z.new_zeros(len(users)).index_add_(0, slot, curvature * (z * z).sum(1))
    user_curvature = t["user_click_curvature"]
    damping = model.user_prior + user_curvature[users].clamp(max=model.user_memory) + spread
    step = push / damping.unsqueeze(1)
    t["user_factors"].index_add_(0, users, step[:, :-1])
    t["user_click_bias"].index_add_(0, users, step[:, -1])
    user_curvature.index_add_(0, u, curvature)
    _item_steps(model, i, "click_bias", t["item_click_curvature"], descent, curvature,
                -descent.unsqueeze(1) * p + model.l2 * q)
    model.click_curvature += float(curvature.sum())
    t["click_offset"] += descent.sum() / (model.item_prior + model.click_curvature)
    return prob.double().cpu().numpy()


def _running_means(model: OnlineMF, y: torch.Tensor) -> torch.Tensor:
    """The global mean as each example of the batch sees it: the mean of all earlier labels."""
    seen = model.n_examples["rating"] + torch.arange(len(y), device=model.device, dtype=torch.float64)
    total = model.rating_sum + torch.cumsum(y.double(), 0) - y.double()
    return torch.where(seen > 0, total / seen.clamp(min=1), model.global_mean).float()


def _item_steps(model: OnlineMF, i: torch.Tensor, bias: str, item_curvature: torch.Tensor,
                descent: torch.Tensor, curvature: torch.Tensor, factor_grad: torch.Tensor) -> None:
    """Newton step on the item biases (prior plus accumulated curvature); row-wise Adagrad on
    the item embeddings with the batch's gradients summed per item (one step per row)."""
    t = model.tables
    item_curvature.index_add_(0, i, curvature)
    t[f"item_{bias}"].index_add_(0, i, descent / (model.item_prior + item_curvature[i]))
    items, slot = torch.unique(i, return_inverse=True)
    grad = factor_grad.new_zeros((len(items), factor_grad.shape[1])).index_add_(0, slot, factor_grad)
    acc = t["item_factors_g2"]
    acc.index_add_(0, items, grad.square().mean(1))
    step = torch.rsqrt(acc[items] + 1e-12).mul_(-model.lr).unsqueeze(1)
    t["item_factors"].index_add_(0, items, grad * step)


def _segment_prefix(values: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """Exclusive prefix sums of the rows of ``values`` within contiguous segments; ``start[j]``
    is the index where row j's segment begins."""
    before = torch.cumsum(values, dim=0) - values
    return before - before[start]


def _tensor(values: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(values).to(device, torch.float32)


@njit(cache=True, nogil=True)
def _distinct(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct values of ``keys`` in sorted order, and each key's index among them."""
    distinct = np.empty(len(keys), dtype=np.int64)
    slot = np.empty(len(keys), dtype=np.int64)
    count = 0
    for j in np.argsort(keys):
        if count == 0 or keys[j] != distinct[count - 1]:
            distinct[count] = keys[j]
            count += 1
        slot[j] = count - 1
    return distinct[:count], slot


@njit(cache=True, nogil=True, fastmath=True)
def _rating_kernel(user_factors, user_bias, user_level, user_curvature, user_implicit, user_rated,
                   user_history, item_factors, item_bias, item_curvature, item_g2, item_implicit,
                   u, i, y, w, label_sum, n_labels, prior_mean, user_prior, user_memory, bias_decay,
                   implicit_lr, item_prior, lr, l2, low, high, score):
    """Compiled form of :func:`rating_step_torch` (same updates, same order): a loop over the
    batch that applies the user steps as it goes, then the item steps and the implicit-feedback
    flush of the whole batch."""
    n, k = len(u), item_factors.shape[1]
    window = user_history.shape[1]
    items, slot = _distinct(i)  # slot: each example's distinct item, in sorted order
    n_items = len(items)
    grad = np.zeros((n_items, k), dtype=np.float32)  # the batch's item gradients, summed per item
    error = np.empty(n)
    implicit_step = np.empty(n)  # g_j / q_j: each example's implicit gradient along its item
    position = np.empty(n, dtype=np.int64)  # the user's rating count before the example
    x = np.empty(k, dtype=np.float32)
    for j in range(n):
        uj, ij, sj = u[j], i[j], slot[j]
        m = user_rated[uj]
        c = 1.0 / np.sqrt(m) if m > 0 else 0.0
        s = ((label_sum / n_labels if n_labels > 0 else prior_mean)
             + user_bias[uj] + user_level[uj] + item_bias[ij])
        label_sum += y[j]
        n_labels += 1
        zz = 2.0
        for f in range(k):
            x[f] = user_factors[uj, f] + c * user_implicit[uj, f]
            s += x[f] * item_factors[ij, f]
            zz += item_factors[ij, f] * item_factors[ij, f]
        e = y[j] - s
        score[j] = min(max(s, low), high)
        error[j] = e
        a = w[j] * e / (user_prior + min(user_curvature[uj], user_memory) + w[j] * zz)
        g = implicit_lr * w[j] * e * c
        shared = min(m, window) * g
        for f in range(k):
            qf = item_factors[ij, f]
            grad[sj, f] += l2 * qf - w[j] * e * x[f]
            user_factors[uj, f] += a * qf
            user_implicit[uj, f] += shared * qf + item_implicit[ij, f]
        user_bias[uj] = bias_decay * (user_bias[uj] + a)
        user_level[uj] += a
        user_curvature[uj] += w[j]
        user_history[uj, m % window] = ij
        user_rated[uj] = m + 1
        implicit_step[j] = g
        position[j] = m
    # implicit feedback: each example's gradient reaches the items its user rated before it that
    # are still among the user's last `window` items (a backward pass sums the later gradients)
    users, user_slot = _distinct(u)
    n_users = len(users)
    later = np.zeros((n_users, k), dtype=np.float32)
    batch_count = np.zeros(n_users, dtype=np.int64)
    for j in range(n - 1, -1, -1):
        uj, ij, m = u[j], i[j], user_slot[j]
        batch_count[m] += 1
        if position[j] >= user_rated[uj] - window:
            for f in range(k):
                item_implicit[ij, f] += later[m, f]
        g = implicit_step[j]
        for f in range(k):
            later[m, f] += g * item_factors[ij, f]
    for m in range(n_users):
        end = user_rated[users[m]]
        for pos in range(max(0, end - window), end - batch_count[m]):
            item = user_history[users[m], pos % window]
            for f in range(k):
                item_implicit[item, f] += later[m, f]
    for j in range(n):
        item_curvature[i[j]] += w[j]
    for j in range(n):
        item_bias[i[j]] += w[j] * error[j] / (item_prior + item_curvature[i[j]])
    for m in range(n_items):
        squared = 0.0
        for f in range(k):
            squared += grad[m, f] * grad[m, f]
        item_g2[items[m]] += squared / k
        step = lr / np.sqrt(item_g2[items[m]] + 1e-12)
        for f in range(k):
            item_factors[items[m], f] -= step * grad[m, f]
