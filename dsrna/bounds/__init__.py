"""Certified bounds of a network's outputs over an l_p ball around its input (METHOD.md §2).

One engine, three methods: ``ibp`` (interval bound propagation), ``crown-ibp`` (IBP intermediate
bounds, CROWN from the output) and ``crown`` (CROWN intermediate bounds too). A model is lowered
into a small graph of primitive ops (:mod:`dsrna.bounds.graph`), each op carrying its interval rule
and its backward linear rule (:mod:`dsrna.bounds.nodes`); :mod:`dsrna.bounds.engine` walks it.
"""

from dsrna.bounds.api import BoundModel, certified_radius, logit_bounds, margin_lower_bound, margin_spec
from dsrna.bounds.engine import METHODS, Propagation
from dsrna.bounds.graph import BoundGraph, lower
from dsrna.bounds.perturbation import NORMS, Ball

__all__ = [
    "BoundModel", "certified_radius", "logit_bounds", "margin_lower_bound", "margin_spec",
    "METHODS", "Propagation", "BoundGraph", "lower", "NORMS", "Ball",
]
