"""Evaluation of found architectures (METHOD.md §5): final training (:mod:`.train`), game-based
robustness by attacks (:mod:`.attack`, attacks themselves in :mod:`dsrna.attacks`),
verification-based robustness by certified radii (:mod:`.certify`), the DARTS-vs-DSRNA comparison
(:mod:`.compare`) and the HTML report of a run folder (:mod:`.report`).

The submodules are imported on use: matplotlib and the bound engine load only when needed.
"""
