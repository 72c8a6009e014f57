"""Token trees: many token sequences packed into one row, each shared prefix stored once.

Causal attention makes a token's states a function of the tokens before it only, so
sequences that share a prefix share the states of that prefix. A ``TokenTree`` keeps one
node per distinct prefix (a trie); run as one row whose attention lets every node see
its ancestors and itself (``ModelView.tree_mask``), with the node's depth as its
position, each node gets exactly the states it has in its own sequence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class TokenTree:
    """``ids``, ``depth``, ``parent`` (-1 for roots): one entry per node, parents first.
    ``nodes[s][t]`` is the node of token ``t`` of sequence ``s``."""

    ids: torch.Tensor  # (N,) long
    depth: torch.Tensor  # (N,) long
    parent: torch.Tensor  # (N,) long
    nodes: list[list[int]]

    def __len__(self) -> int:
        return len(self.ids)

    def ancestors(self) -> torch.Tensor:
        """(N, N) bool: ``[i, j]`` when node j is node i or one of its ancestors."""
        n = len(self)
        anc = torch.eye(n, dtype=torch.bool)
        for d in range(1, int(self.depth.max()) + 1 if n else 0):  # a level at a time
            at = (self.depth == d).nonzero()[:, 0]
            anc[at] |= anc[self.parent[at]]
        return anc


def token_tree(seqs: Sequence[Sequence[int]]) -> TokenTree:
    """The trie of ``seqs``: nodes in order of first appearance, so parents come first."""
    index: dict[tuple[int, int], int] = {}
    ids: list[int] = []
    depth: list[int] = []
    parent: list[int] = []
    nodes = []
    for seq in seqs:
        at, path = -1, []
        for d, tok in enumerate(seq):
            key = (at, int(tok))
            if key not in index:
                index[key] = len(ids)
                ids.append(int(tok))
                depth.append(d)
                parent.append(at)
            at = index[key]
            path.append(at)
        nodes.append(path)
    t = torch.as_tensor
    return TokenTree(t(ids, dtype=torch.long), t(depth, dtype=torch.long),
                     t(parent, dtype=torch.long), nodes)
