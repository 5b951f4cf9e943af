"""Data sets behind the presets. Each loader returns `Splits`: train, held-out (ranking) and test
(reporting only) as tensors, with the held-out split carved from the training part."""
from .splits import Splits, stratified_splits
from .digits import load_digits

__all__ = ["Splits", "load_digits", "stratified_splits"]
