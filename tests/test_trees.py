"""Token trees: one node per distinct prefix, ancestors by brute force, and a tree run as
one row equals every sequence run alone (tiny models, float64)."""

import pytest
import torch

from cnalens.models import ModelView
from cnalens.trees import token_tree
from tiny import TinyTokenizer, tiny_model

SEQS = [[1, 5, 6, 7], [1, 5, 6, 8, 9], [1, 5, 3], [2, 5], [1, 5, 6, 7], [1]]


def test_nodes_are_distinct_prefixes():
    tree = token_tree(SEQS)
    prefixes = {tuple(s[:k + 1]) for s in SEQS for k in range(len(s))}
    assert len(tree) == len(prefixes) == 9
    for seq, path in zip(SEQS, tree.nodes, strict=True):
        assert len(path) == len(seq)
        for k, node in enumerate(path):
            assert int(tree.ids[node]) == seq[k] and int(tree.depth[node]) == k
            assert int(tree.parent[node]) == (path[k - 1] if k else -1)
    assert tree.nodes[0] == tree.nodes[4]  # a repeated sequence reuses its nodes
    assert (tree.parent < torch.arange(len(tree))).all()  # parents first


def test_ancestors_brute_force():
    tree = token_tree(SEQS)
    prefix = {}
    for seq, path in zip(SEQS, tree.nodes, strict=True):
        for k, node in enumerate(path):
            prefix[node] = tuple(seq[:k + 1])
    want = torch.tensor([[prefix[i][:len(prefix[j])] == prefix[j] for j in range(len(tree))]
                         for i in range(len(tree))])
    assert torch.equal(tree.ancestors(), want)
    assert token_tree([]).ancestors().shape == (0, 0)


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2", "gemma2"])
def test_tree_run_equals_each_sequence(family):
    # gemma2/3 have a sliding window of 4 < the depth: masks per layer type
    v = ModelView(tiny_model(family), TinyTokenizer(), {"spec": family})
    seqs = [[1, 5, 6, 7, 9, 3], [1, 5, 6, 8], [1, 5, 6, 7, 4], [1, 11]]
    tree = token_tree(seqs)
    mask = v.tree_mask(tree)
    assert isinstance(mask, dict) == family.startswith("gemma")
    with torch.no_grad():
        packed = v.run_tree(tree.ids, tree.depth, mask, rows=2)
        assert torch.allclose(packed[0], packed[1], atol=1e-12)
        for seq, path in zip(seqs, tree.nodes, strict=True):
            alone = v.hidden(v.batch([seq]))[0]
            assert torch.allclose(packed[0, path], alone, atol=1e-10)


def test_windowed_model_without_masks_per_layer_cannot_run_trees():
    import transformers as tf
    cfg = tf.MistralConfig(vocab_size=61, hidden_size=32, intermediate_size=40,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           sliding_window=3, pad_token_id=0)
    v = ModelView(tf.MistralForCausalLM(cfg).double().eval(), TinyTokenizer(), {})
    assert v.tree_mask(token_tree([[1, 2]])) is not None  # depth under the window
    assert v.tree_mask(token_tree([[1, 2, 3, 4]])) is None
