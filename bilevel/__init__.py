"""bilevel: functional bilevel primitives for meta-reinforcement learning."""

from bilevel import tree

__version__ = "0.1.0"

__all__ = ["tree"]
