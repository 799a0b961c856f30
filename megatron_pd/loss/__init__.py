"""Losses over vocab-parallel logits: LM cross-entropy and the fused distillation losses."""
