"""DeepSeek Sparse Attention for the LM: a lightning indexer picks each query's top-k past tokens.

The layer (module.DSA) trains in two stages (notes/moe_lm.md):
  "warmup": dense causal attention; only the indexer learns, from KL(p || softmax(I)) with p the main attention
            summed over heads and L1-normalised;
  "sparse": attention over the top-k tokens only; the indexer learns from the KL over the selected set, on a
            detached input (the model learns only from the LM loss, the indexer only from the KL).
"""
from .reference import attention_probs, indexer_kl, indexer_scores, topk_mask

__all__ = ["attention_probs", "indexer_kl", "indexer_scores", "topk_mask"]
