"""The server half of the protocol, written once as plain functions over one server state.

* :mod:`.state`: :class:`ServerState` (global model, server optimizer, lr schedule, FedBuff buffer,
  version, round); its ``state_dict`` is the checkpoint.
* :mod:`.plan`: the plan step (the user-level budget check, the cohort, each node's request).
* :mod:`.replies`: every reply checked (a bad one fails alone).
* :mod:`.apply`: the apply step (validate -> bound -> ledger -> aggregate -> optimizer -> publish).
* :mod:`.run`: the loop over rounds, over any :class:`~.run.Transport` (the Flower ServerApp is one).
"""
