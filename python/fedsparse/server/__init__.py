"""The server side of federated fine-tuning: aggregation of packed updates and client selection.

Needs numpy only (never imports torch). docs/aggregation.md describes the rules and the metadata.
"""
from .aggregate import METHODS, AggregateResult, aggregate
from .meta import AggregationError
from .selection import select_clients

__all__ = ["METHODS", "AggregateResult", "AggregationError", "aggregate", "select_clients"]
