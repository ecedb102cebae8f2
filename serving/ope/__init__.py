"""Off-policy evaluation: what clicks a candidate policy would get, estimated from the logged slates.

``estimators``  per-position IPS / SNIPS / DR under the position-based click model, whole-slate IPS
``logdata``     the logged slates (worker log, OBP-layout CSV, serving's recent outcomes) as arrays
``candidates``  candidate policies (a model snapshot + a serving policy, popularity, uniform) on a log
``evidence``    the promotion check on evidence that the shadow check asks before a snapshot goes live
``cli``         ``streamrec evaluate``

The equations and the validation against the simulator's truth are in docs/ope.md.
"""
