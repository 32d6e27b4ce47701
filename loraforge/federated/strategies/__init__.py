"""Federated strategies, one file each, registered under the name `--strategy` takes.

A strategy is a subclass of `Strategy` that names itself, `class FLoRA(Strategy, name="flora")`, and
is registered in STRATEGIES when its class is created. STRATEGIES imports every module of this
package on its first lookup, so `aggregate`, the `fed aggregate` and `fed run` choices, the Flower
app and `bench fed` find a new strategy (a new file here, or a subclass defined anywhere) without
naming it. A strategy says three things, in the notation of aggregate.py:

    aggregate(clients, weights)   this round's aggregate of the clients' adapters, weights p_k
    fresh_clients                 where a client starts a round: from the global adapter itself
                                  (False), or from the base with the global merged in plus a fresh
                                  LoRA of its own rank (True)
    combine(glob, agg)            the next global adapter from this one and the round's aggregate

and, for `bench fed`'s report, its `title` and the strategies its paper reports it above.

Its settings (pad, lam) are the keyword arguments of its constructor, named like the `fed aggregate`
flags and the `fed run` settings that carry them: `STRATEGIES.settings(name)` lists them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

from loraforge.core.plugins import Plugins
from loraforge.federated.aggregate import Aggregate, ClientAdapter

STRATEGIES = Plugins("strategy", "loraforge.federated.strategies")  # name -> Strategy subclass


class Strategy(ABC):
    name: ClassVar[str]  # what --strategy calls it; the aggregate's config records it
    title: ClassVar[str]  # how reports write it: "FedAvg", "FLoRA"
    # False: the server initialises the global adapter before round 1 and every client trains it, so
    # all send its ranks. True: every round each client merges the global adapter into its copy of
    # the base and trains a fresh LoRA of its own rank r_k, so the ranks may differ (--ranks 4,8,16).
    fresh_clients: ClassVar[bool] = False
    reported_above: ClassVar[tuple[str, ...]] = ()  # strategies its paper reports it above (`bench fed` checks)

    def __init_subclass__(cls, name: str, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.name = name
        STRATEGIES.register(name)(cls)

    @abstractmethod
    def aggregate(self, clients: list[ClientAdapter], weights: list[float]) -> Aggregate:
        """This round's aggregate of `clients` (already through `check_clients`) with weights p_k."""

    def combine(self, glob: Aggregate | None, agg: Aggregate) -> Aggregate:
        """The global adapter of the next round: the round's aggregate replaces the previous one."""
        return agg


def taking(setting: str) -> list[str]:
    """The strategies that take `setting` (for the flags' help and errors)."""
    return [name for name in STRATEGIES.names() if setting in STRATEGIES.settings(name)]


def with_fresh_clients() -> list[str]:
    """The strategies whose clients train a fresh LoRA every round, so their ranks may differ."""
    return [name for name in STRATEGIES.names() if STRATEGIES.get(name).fresh_clients]
