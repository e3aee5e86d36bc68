"""An in-process grid: the ServerApp's messages go straight to the ClientApp, no Ray, no RPC.

``fedrec simulate --engine local`` (and the sweeps) run the *same* ServerApp round loop and the
*same* ClientApp handlers as Flower's Simulation Engine; only the transport differs. Each virtual
node keeps its own :class:`flwr.app.Context` (node config with ``partition-id`` /
``num-partitions``, and a ``state`` that persists across rounds), exactly as a Ray virtual node
would, and a handler that raises becomes an error reply, as it does in Flower. Nodes are served one
after another in this process: with one torch thread this is the fastest way to use one core, and
a sweep runs several such processes side by side. A test holds this engine and the Ray engine to
the same global model for the same seed.
"""

from __future__ import annotations

import copy
import traceback
import uuid
from collections.abc import Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

_FIRST_NODE = 1001


class LocalGrid(Grid):
    """``nodes`` virtual nodes served in-process by ``client_app``."""

    def __init__(self, client_app: ClientApp, nodes: int, run_config: dict | None = None) -> None:
        self._app = client_app
        # Flower stamps messages with the identity of the process's task; in-process we are the server
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 0, SUPERLINK_NODE_ID, 0
        self._contexts = {
            _FIRST_NODE + p: Context(run_id=0, node_id=_FIRST_NODE + p,
                                     node_config={"partition-id": p, "num-partitions": nodes},
                                     state=RecordDict(), run_config=dict(run_config or {}))
            for p in range(nodes)
        }
        self._replies: dict[str, Message] = {}
        self._run = None

    # -- the Grid interface ---------------------------------------------------------------------
    def set_run(self, run) -> None:  # the run id does not matter in-process
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            key = str(uuid.uuid4())  # as Flower's grids do: the reply's reply_to_message_id names it
            msg.metadata.__dict__["_message_id"] = key
            self._replies[key] = self._deliver(msg)
            ids.append(key)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return [self._deliver(m) for m in messages]

    # -- delivery ---------------------------------------------------------------------------------
    def _deliver(self, msg: Message) -> Message:
        ctx = self._contexts.get(msg.metadata.dst_node_id)
        if ctx is None:
            return Message(Error(code=404, reason=f"no node {msg.metadata.dst_node_id}"), reply_to=msg)
        try:  # a node gets its own copy, as over the network (Flower's SecAgg+ mod edits what it receives)
            return self._app(copy.deepcopy(msg), ctx)
        except Exception as e:  # a failing handler is an error reply, as in Flower, never a crash
            return Message(Error(code=500, reason=f"{type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}"),
                           reply_to=msg)
