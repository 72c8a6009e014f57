"""Applications built on the CNA map: LoRA mechanism, pruning, debiasing."""
