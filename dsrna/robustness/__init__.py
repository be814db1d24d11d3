"""The two differentiable robustness metrics that the architecture step maximises (METHOD.md §2-3).

``certified_bound_metric`` (R_CB) comes from the bound engine :mod:`dsrna.bounds`;
``jacobian_metric`` (R_Jac) from input-Jacobian row norms. ``ROBUSTNESS_TERMS`` maps the search's
``--robustness`` choice to the function computing R on a batch.
"""
