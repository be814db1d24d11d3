"""The DARTS search space: candidate ops, the super-network, genotypes and the final network."""

from dsrna.space.genotype import BUILTIN, DARTS_V1, DARTS_V2, PRIMITIVES, Genotype
from dsrna.space.network import Network, count_parameters
from dsrna.space.ops import capture_batch_stats, frozen_batch_stats
from dsrna.space.search_network import MixedOp, SearchCell, SearchNetwork

__all__ = [
    "BUILTIN", "DARTS_V1", "DARTS_V2", "PRIMITIVES", "Genotype", "Network", "count_parameters",
    "capture_batch_stats", "frozen_batch_stats", "MixedOp", "SearchCell", "SearchNetwork",
]
