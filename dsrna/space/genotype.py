"""The discrete architecture: DARTS' ``Genotype``, its JSON form, and the published DARTS cells."""

from __future__ import annotations

import json
from collections import namedtuple
from pathlib import Path

from dsrna.errors import first_line

# Candidate ops of the DARTS space, in the order of the columns of the architecture parameters.
PRIMITIVES = (
    "none",
    "max_pool_3x3",
    "avg_pool_3x3",
    "skip_connect",
    "sep_conv_3x3",
    "sep_conv_5x5",
    "dil_conv_3x3",
    "dil_conv_5x5",
)


class Genotype(namedtuple("Genotype", "normal normal_concat reduce reduce_concat")):
    """A cell pair in DARTS form: ``normal``/``reduce`` list ``(op_name, input_index)`` pairs, two per
    intermediate node; ``*_concat`` list the states concatenated into the cell output.

    Genotypes printed by the original DARTS code paste in unchanged.
    """

    __slots__ = ()

    @property
    def steps(self) -> int:
        return len(self.normal) // 2

    def validate(self) -> "Genotype":
        """Raise ``ValueError`` naming the first problem; return self when valid."""
        for kind in ("normal", "reduce"):
            edges = getattr(self, kind)
            if len(edges) == 0 or len(edges) % 2:
                raise ValueError(f"genotype.{kind}: expected two (op, input) pairs per node, got {len(edges)} pairs")
            for k, edge in enumerate(edges):
                if not (isinstance(edge, (tuple, list)) and len(edge) == 2):
                    raise ValueError(f"genotype.{kind}[{k}]: expected an (op, input) pair, got {edge!r}")
                op, index = edge
                node = 2 + k // 2
                if op not in PRIMITIVES or op == "none":
                    raise ValueError(f"genotype.{kind}[{k}]: unknown op {op!r} (valid: {', '.join(PRIMITIVES[1:])})")
                if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < node:
                    raise ValueError(f"genotype.{kind}[{k}]: node {node} cannot take input {index!r} (valid: 0..{node - 1})")
            concat = list(getattr(self, kind + "_concat"))
            n_states = 2 + len(edges) // 2
            # the cell's own nodes: its inputs 0 and 1 keep the previous resolution in a reduction cell
            if not concat or any(not isinstance(i, int) or isinstance(i, bool) or not 2 <= i < n_states for i in concat):
                raise ValueError(f"genotype.{kind}_concat: {concat!r} must name the cell's nodes, states 2..{n_states - 1}")
        if len(self.normal) != len(self.reduce):
            raise ValueError(f"genotype: normal has {len(self.normal) // 2} nodes but reduce has {len(self.reduce) // 2}")
        return self

    def to_dict(self) -> dict:
        return {
            "normal": [[op, int(i)] for op, i in self.normal],
            "normal_concat": [int(i) for i in self.normal_concat],
            "reduce": [[op, int(i)] for op, i in self.reduce],
            "reduce_concat": [int(i) for i in self.reduce_concat],
        }

    def to_json(self, path: str | Path | None = None) -> str:
        """The JSON text; also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_dict(cls, data: dict) -> "Genotype":
        if not isinstance(data, dict):
            raise ValueError(f"genotype: expected a JSON object, got {type(data).__name__}")
        missing = [f for f in cls._fields if f not in data]
        if missing:
            raise ValueError(f"genotype: missing field(s) {', '.join(missing)}")
        for field in cls._fields:
            if not isinstance(data[field], list):
                raise ValueError(f"genotype.{field}: expected a list, got {json.dumps(data[field])}")

        def pairs(kind):
            return [tuple(e) if isinstance(e, (list, tuple)) else e for e in data[kind]]
        return cls(pairs("normal"), data["normal_concat"], pairs("reduce"), data["reduce_concat"]).validate()

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> "Genotype":
        """Parse JSON text, a path to a ``.json`` file, or a built-in name (``DARTS_V2``)."""
        text = str(text_or_path)
        if text in BUILTIN:
            return BUILTIN[text]
        where, path = "genotype", Path(text)
        try:
            is_file = path.is_file()
        except OSError:  # a JSON text too long for a file name
            is_file = False
        if is_file:
            where = f"genotype file {path}"
            try:
                text = path.read_text()
            except UnicodeDecodeError:
                raise ValueError(f"{where}: not a text (JSON) file") from None
        elif not text.lstrip().startswith(("{", "[")):
            raise ValueError(f"genotype: {text!r} is neither JSON, a file, nor a built-in name ({', '.join(BUILTIN)})")
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as exc:  # RecursionError: absurdly deep nesting
            raise ValueError(f"{where}: invalid JSON ({type(exc).__name__}: {first_line(exc)})") from None
        return cls.from_dict(data)


DARTS_V1 = Genotype(
    normal=[("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("skip_connect", 0), ("sep_conv_3x3", 1),
            ("skip_connect", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("skip_connect", 2)],
    normal_concat=[2, 3, 4, 5],
    reduce=[("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 0),
            ("max_pool_3x3", 0), ("skip_connect", 2), ("skip_connect", 2), ("avg_pool_3x3", 0)],
    reduce_concat=[2, 3, 4, 5],
)
DARTS_V2 = Genotype(
    normal=[("sep_conv_3x3", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("sep_conv_3x3", 1),
            ("sep_conv_3x3", 1), ("skip_connect", 0), ("skip_connect", 0), ("dil_conv_3x3", 2)],
    normal_concat=[2, 3, 4, 5],
    reduce=[("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 1),
            ("max_pool_3x3", 0), ("skip_connect", 2), ("skip_connect", 2), ("max_pool_3x3", 1)],
    reduce_concat=[2, 3, 4, 5],
)
BUILTIN = {"DARTS_V1": DARTS_V1, "DARTS_V2": DARTS_V2, "DARTS": DARTS_V2}
