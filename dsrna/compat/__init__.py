"""Drop-in replacements for other architecture-search code bases (see :mod:`dsrna.compat.darts`)."""
