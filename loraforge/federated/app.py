"""The Flower app that `flwr run` deploys: a ServerApp with loraforge's strategies and a ClientApp that
trains with loraforge's trainer (flower.py's, the one `loraforge fed run` simulates, so both execute
the same code).

    flwr run . local --run-config "clients=10 rounds=5 strategy='flora' ranks='4,8,16'" \\
        --federation-config "num-supernodes=10"          # Flower's simulation engine, one machine

Flower's managed local SuperLink installs the app's dependencies into a fresh environment with uv,
which needs the package index; where the environment you run from already has loraforge[fed] (or
offline), start the SuperLink yourself without that step and `flwr run . local` uses it:

    flower-superlink --insecure --simulation --disable-runtime-dependency-installation \
        --control-api-address 127.0.0.1:39093 --port 39091 &

pyproject.toml's [tool.flwr.app] names these two objects and holds the defaults of the run config
(the FedRunConfig fields, hyphenated). On a real network the same app runs unchanged: start a
SuperLink, one SuperNode per client with `--node-config "partition-id=K num-partitions=N"` and the
data file at the run config's `data` path, then `flwr run . <connection>`. Every client reads that
file and keeps partition K of it (the run's iid or Dirichlet split), as in simulation.
"""

from __future__ import annotations

import typing

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from loraforge.core.configs import parse_flat
from loraforge.federated.flower import FedRunConfig, client_app, prepare, server_main

# pyproject's two components; Flower reads this file for their names, and client_app lives in flower.py,
# whose `run` simulates it
__all__ = ["client_app", "config_from_run_config", "serve_rounds", "server_app"]

server_app = ServerApp()


@server_app.main()
def serve_rounds(grid: Grid, context: Context) -> None:
    """Every round of the run the run config describes, checkpointed as `loraforge fed run` does."""
    cfg = config_from_run_config(dict(context.run_config))
    prepare(cfg)
    server_main(grid, context, cfg)


def config_from_run_config(run_config: dict[str, typing.Any]) -> FedRunConfig:
    """FedRunConfig from Flower's run config (hyphenated keys, TOML scalars); unknown keys are refused,
    since a misspelt setting would otherwise silently keep its default."""
    return FedRunConfig(**parse_flat(FedRunConfig, run_config, source="run config"))
