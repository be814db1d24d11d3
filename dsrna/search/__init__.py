"""The bilevel search engine (METHOD.md §4): :class:`Searcher` runs one iteration on given batches,
:class:`GraphedSearcher` replays its steps from CUDA graphs, :func:`run_search` the whole run with
data, checkpoints, logs and pictures (``dsrna search``)."""

from dsrna.search.config import PRESETS, SearchConfig
from dsrna.search.cuda_graph import GraphedSearcher
from dsrna.search.loop import SearchData, SearchResult, load_search_data, run_search
from dsrna.search.searcher import Searcher, finite_difference_hvp, learning_rate, sgd_lookahead

__all__ = [
    "GraphedSearcher", "PRESETS", "SearchConfig", "SearchData", "SearchResult", "Searcher", "finite_difference_hvp",
    "learning_rate", "load_search_data", "run_search", "sgd_lookahead",
]
