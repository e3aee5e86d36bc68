"""A SASRec-style self-attentive sequential recommender (Kang & McAuley, ICDM 2018), DP-ready.

The device's user state is its own recent item sequence: it stays on the device and the model has
no local parameters. The item table, the positional embeddings and the transformer blocks are
global. Attention is built from ``nn.Linear`` + ``scaled_dot_product_attention`` + ``LayerNorm``
(Opacus 1.6's ``DPMultiheadAttention`` is wrong with ``batch_first=True``), and each forward looks
up each embedding table once, as Opacus ghost clipping needs.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .base import RecModel, seeded_linear


class CausalBlock(nn.Module):
    """Pre-norm transformer block, one head: ``x (B, L, d)``, ``mask (B, 1, L, L)`` bool (True = may attend)."""

    def __init__(self, dim: int, generator: torch.Generator) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = seeded_linear(dim, 3 * dim, generator)
        self.proj = seeded_linear(dim, dim, generator)
        self.ln2 = nn.LayerNorm(dim)
        self.ff1 = seeded_linear(dim, dim, generator)
        self.ff2 = seeded_linear(dim, dim, generator)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.ln1(x)).unsqueeze(1).chunk(3, dim=-1)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v, attn_mask=mask).squeeze(1))
        return x + self.ff2(torch.relu(self.ff1(self.ln2(x))))


class SASRec(RecModel):
    """Next-item scores ``s(i | x_1..x_t) = <h_t, e_i>`` with ``h_t`` the causal encoding of the sequence.

    Parameters
    ----------
    n_items, dim : int
        ``item.weight`` has shape ``(n_items + 2, dim + 1)``: row ``n_items`` is the start token
        (``BOS``), row ``n_items + 1`` the padding (``PAD``, masked out of attention and loss). The
        same table embeds the input sequence (its first ``dim`` columns) and scores the candidates
        (tied, as in SASRec); its last column is an item bias added to the score, which lets the
        model carry popularity from the first rounds on.
    seq_len : int
        ``L``, the longest input sequence (positional table ``pos.weight`` of shape ``(L, dim)``).
    blocks : int
        Transformer blocks (one head each).
    """

    uses_history = True
    local_names = ()

    def __init__(self, n_items: int, dim: int, *, seq_len: int = 20, blocks: int = 2,
                 generator: torch.Generator | None = None, init_scale: float = 0.1) -> None:
        super().__init__()
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        self.n_items, self.dim, self.seq_len, self.init_scale = n_items, dim, seq_len, init_scale
        self.bos, self.pad = n_items, n_items + 1
        self.item = nn.Embedding(n_items + 2, dim + 1)
        self.pos = nn.Embedding(seq_len, dim)
        self.blocks = nn.ModuleList([CausalBlock(dim, g) for _ in range(blocks)])
        self.ln = nn.LayerNorm(dim)
        with torch.no_grad():
            self.item.weight.normal_(0.0, init_scale, generator=g)
            self.item.weight[:, dim] = 0.0
            self.pos.weight.normal_(0.0, init_scale, generator=g)
        self.global_names = tuple(n for n, _ in self.named_parameters())
        self.check_partition()

    def init_local(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return {}

    def _encode(self, x: torch.Tensor, seq: torch.Tensor) -> torch.Tensor:
        """``x``: embedded inputs (B, L, d) of ids ``seq`` (B, L) -> hidden states (B, L, d)."""
        B, L = seq.shape
        x = x + self.pos(torch.arange(L).repeat(B, 1))
        real = seq != self.pad
        eye = torch.eye(L, dtype=torch.bool)
        # causal, over real positions; a padding position attends to itself only (no empty softmax row)
        mask = (torch.tril(torch.ones(L, L, dtype=torch.bool)) & real.unsqueeze(1)) | eye
        mask = mask.unsqueeze(1)
        for blk in self.blocks:
            x = blk(x, mask)
        return self.ln(x)

    def forward(self, seq: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """``seq``: (B, L) input ids (left-padded, starting with BOS or an earlier item); ``items``:
        (B, L, 1 + K) the target of each position then K negatives -> scores (B, L, 1 + K)."""
        B, L = seq.shape
        e = self.item(torch.cat([seq, items.reshape(B, -1)], dim=1))  # one lookup of the table, batch first
        d = self.dim
        h = self._encode(e[:, :L, :d], seq)
        c = e[:, L:].reshape(B, L, items.shape[2], d + 1)
        return (c[..., :d] * h.unsqueeze(2)).sum(-1) + c[..., d]

    def context(self, history: np.ndarray | None) -> torch.Tensor:
        """The input sequence that predicts what follows ``history``: BOS then its last L - 1 items."""
        h = np.asarray(history if history is not None else [], dtype=np.int64)[-(self.seq_len - 1):]
        seq = np.full(self.seq_len, self.pad, np.int64)
        seq[self.seq_len - len(h) - 1] = self.bos
        if len(h):
            seq[self.seq_len - len(h):] = h
        return torch.from_numpy(seq)

    @torch.no_grad()
    def score_all(self, history: np.ndarray | None = None, kinds: np.ndarray | None = None) -> torch.Tensor:
        seq = self.context(history).unsqueeze(0)
        h = self._encode(self.item(seq)[..., : self.dim], seq)[0, -1]
        w = self.item.weight[: self.n_items]
        return w[:, : self.dim] @ h + w[:, self.dim]

    def item_repr(self) -> torch.Tensor:
        return self.item.weight.detach()[: self.n_items, : self.dim]

    @torch.no_grad()
    def score_events(self, history: np.ndarray, new: np.ndarray, vector: np.ndarray | None, *,
                     context: int, kinds: np.ndarray | None = None) -> torch.Tensor:
        """:meth:`RecModel.score_events`: the history grows per event (its user state is the history); all
        rows are encoded as one batch of sequences (``context`` is not used: the sequence length is)."""
        seq = np.concatenate([np.asarray(history, np.int64), np.asarray(new, np.int64)])
        ctx = torch.stack([self.context(seq[: len(history) + j]) for j in range(len(new) + 1)])
        w = self.item.weight[: self.n_items]
        rows = []
        for a in range(0, len(ctx), 256):
            c = ctx[a:a + 256]
            h = self._encode(self.item(c)[..., : self.dim], c)[:, -1]
            rows.append(h @ w[:, : self.dim].T + w[:, self.dim])
        return torch.cat(rows)

    def samples(self, items: np.ndarray, rounds: np.ndarray, train: np.ndarray, cand: torch.Tensor, *,
                negatives: int, generator: torch.Generator, sessions: bool = False, kinds: np.ndarray | None = None
                ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """Sequence samples: each has up to L target positions, each target predicted from the items
        before it in the sample.

        * ``sessions=False`` (no DP, user-level DP): the training events, in time order, are cut into
          chunks of L from the newest back; a chunk's input is the event before it in the device's
          history (or BOS) followed by the chunk's own items but its last.
        * ``sessions=True`` (event-level DP): one sample per round window (a *session*), its newest
          L events, input BOS then its own items: a sample reads no event outside itself, so removing
          a session removes one sample and changes no other (see docs/privacy.md, "Sequence model").
        """
        L, K = self.seq_len, negatives
        idx = np.flatnonzero(train)
        chunks: list[tuple[np.ndarray, int]] = []  # (event indices of the targets, id of the first input)
        if sessions:
            for r in np.unique(rounds[idx]):
                tgt = idx[rounds[idx] == r][-L:]
                chunks.append((tgt, self.bos))
        else:
            for end in range(len(idx), 0, -L):
                tgt = idx[max(0, end - L): end]
                chunks.append((tgt, int(items[tgt[0] - 1]) if tgt[0] > 0 else self.bos))
            chunks.reverse()
        n = len(chunks)
        seq = torch.full((n, L), self.pad, dtype=torch.long)
        cand_items = torch.full((n, L, 1 + K), self.pad, dtype=torch.long)
        weight = torch.zeros(n, L)
        for j, (tgt, first) in enumerate(chunks):
            m = len(tgt)
            t = torch.from_numpy(items[tgt].astype(np.int64))
            seq[j, L - m] = first
            seq[j, L - m + 1:] = t[:-1]
            cand_items[j, L - m:, 0] = t
            weight[j, L - m:] = 1.0
        if n:
            neg = cand[torch.randint(0, len(cand), (n, L, K), generator=generator)]
            cand_items[..., 1:] = torch.where(weight.bool().unsqueeze(-1), neg, cand_items[..., 1:])
        return (seq, cand_items), weight
