"""The search (design.md layer 2): posterior training, candidate sampling and ranking, export."""
from .rank import accuracy, best_candidate, rank_candidates, uniform_drop_logits
from .run import RunError, SearchResult, run_search
from .train import train_posterior

__all__ = ["RunError", "SearchResult", "accuracy", "best_candidate", "rank_candidates", "run_search",
           "train_posterior", "uniform_drop_logits"]
