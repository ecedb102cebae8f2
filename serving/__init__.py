"""Serving for streamrec: live recommendations from a model that refreshes itself.

A replica (``streamrec serve``, ``serving.app``) bootstraps from the newest verified snapshot in
the model store, applies the learner's deltas from ``model.updates`` as whole new versions
(double-buffered: a request sees one complete version), answers ``GET /recommendations`` with
exact propensities, and monitors served RMSE and drift from the outcomes on ``examples``.

Modules, one job each:

========================  =========================================================================
``table``                 copy-on-write id-to-row tables shared between model versions
``model``                 one immutable model version: scores, and the next version from deltas
``live``                  the live version (swapped whole) and the recent ones
``updates``               bootstrap from the store, follow ``model.updates``, promote snapshots
``shadow``                the check a candidate snapshot must pass before promotion
``ope``                   off-policy evaluation from the logged slates (``streamrec evaluate``)
``policies``              greedy, epsilon-greedy and softmax (Plackett-Luce) with propensities
``scorer``                micro-batched scoring of concurrent requests (exact mode)
``index``                 IVF item index: candidates for large catalogues, scored exactly
``recommend``             a recommendation or prediction from the live version
``seen``, ``popularity``  per-user seen items, popularity fallback for unknown users
``drift``, ``monitor``    PSI/KS drift, served RMSE, fed from ``examples``
``metrics``               the replica's Prometheus registry (DESIGN.md names)
``api``                   the aiohttp routes and request validation
``settings``, ``app``,    settings, one replica wired together, the command line
``cli``
========================  =========================================================================
"""
