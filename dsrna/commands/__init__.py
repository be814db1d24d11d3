"""Thin command-line front ends, one module per ``dsrna`` subcommand (see :mod:`dsrna.cli`)."""
