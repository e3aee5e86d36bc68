"""The stock pattern, written the way Flower's own examples do it: the baseline of bench_throughput.

* one Ray-scheduled ClientApp per device (``num_supernodes`` = number of users; ``partition-id``
  picks the user), instantiated for every message;
* the whole model (user table and item table, float32) shipped down and up every round;
* a new Opacus ``PrivacyEngine`` per round in its default ``hooks`` mode (dense per-sample
  gradients), one local epoch with a DataLoader, as in Flower's Opacus example;
* Flower's ``FedAvg`` strategy sampling ``fraction_train`` of the nodes per round.

It trains the same MF (BPR, one negative) on the same ml-latest-small ratings. Nothing here is
used by fedrec; it exists to be measured against.
"""

from __future__ import annotations

import time
import warnings
from functools import lru_cache

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from torch import nn

warnings.filterwarnings("ignore")
DIM = 32
DATA = {"path": "", "dp": False, "rounds": 3, "fraction": 0.1}
TIMES: list[float] = []


class StockMF(nn.Module):
    def __init__(self, n_users: int, n_items: int, dim: int = DIM) -> None:
        super().__init__()
        self.user = nn.Embedding(n_users, dim)
        self.item = nn.Embedding(n_items, dim + 1)
        nn.init.normal_(self.user.weight, std=0.1)
        nn.init.normal_(self.item.weight, std=0.1)

    def forward(self, u: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        p = self.user(u)
        ep, en = self.item(pos), self.item(neg)
        return (p * (ep[:, :DIM] - en[:, :DIM])).sum(-1) + ep[:, DIM] - en[:, DIM]


@lru_cache(maxsize=1)
def _data(path: str):
    from fedrec.data.loaders import load_events

    log = load_events(path)
    return log.user, log.item, log.n_users, log.n_items


client = ClientApp()


@client.train()
def train(msg: Message, context: Context) -> Message:
    users, items, n_users, n_items = _data(msg.content["config"]["data"])
    dp = bool(msg.content["config"]["dp"])
    u = int(context.node_config["partition-id"])
    mine = items[users == u]
    model = StockMF(n_users, n_items)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    g = torch.Generator().manual_seed(u)
    ds = torch.utils.data.TensorDataset(torch.full((len(mine),), u), torch.from_numpy(mine),
                                        torch.randint(0, n_items, (len(mine),), generator=g))
    loader = torch.utils.data.DataLoader(ds, batch_size=32, shuffle=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    net = model
    if dp:
        from opacus import PrivacyEngine

        engine = PrivacyEngine()  # a new engine every round, as Flower's Opacus example does
        net, opt, loader = engine.make_private(module=model, optimizer=opt, data_loader=loader,
                                               noise_multiplier=1.0, max_grad_norm=1.0)
    for uu, pp, nn_ in loader:
        if len(uu) == 0:
            continue
        opt.zero_grad()
        nn.functional.softplus(-net(uu, pp, nn_)).mean().backward()
        opt.step()
    state = (net._module if dp else net).state_dict()
    return Message(RecordDict({"arrays": ArrayRecord(torch_state_dict=state),
                               "metrics": MetricRecord({"num-examples": len(mine)})}), reply_to=msg)


server = ServerApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    from flwr.app import ConfigRecord

    _, _, n_users, n_items = _data(DATA["path"])
    model = StockMF(n_users, n_items)
    strategy = FedAvg(fraction_train=DATA["fraction"], fraction_evaluate=0.0, min_available_nodes=n_users)

    def evaluate(rnd: int, arrays: ArrayRecord):  # called before round 1 and after every round: a clock
        TIMES.append(time.time())
        return MetricRecord({"round": rnd})

    strategy.start(grid=grid, initial_arrays=ArrayRecord(torch_state_dict=model.state_dict()),
                   num_rounds=DATA["rounds"], train_config=ConfigRecord({"data": DATA["path"], "dp": DATA["dp"]}),
                   evaluate_fn=evaluate)


def run(path: str, *, dp: bool, rounds: int, fraction: float, num_cpus: int = 2) -> dict:
    """Run the stock pattern; returns device-updates per second over the timed rounds."""
    from flwr.simulation import run_simulation

    _, _, n_users, n_items = _data(path)
    DATA.update(path=path, dp=dp, rounds=rounds, fraction=fraction)
    TIMES.clear()
    run_simulation(server_app=server, client_app=client, num_supernodes=n_users,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": num_cpus, "include_dashboard": False,
                                                 "logging_level": "ERROR"}})
    per_round = max(int(fraction * n_users), 1)
    # the first round includes actor start-up; time the rounds after it
    timed = TIMES[2:] if len(TIMES) > 2 else TIMES
    span = timed[-1] - timed[0] if len(timed) > 1 else float("nan")
    model_bytes = (n_users * DIM + n_items * (DIM + 1)) * 4
    return {"updates_per_s": per_round * (len(timed) - 1) / span, "rounds_timed": len(timed) - 1,
            "devices_per_round": per_round, "bytes_up_per_update": model_bytes, "bytes_down_per_update": model_bytes}
