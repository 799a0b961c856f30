"""Token data: tokenizer, corpus discovery, preprocessing to .bin/.idx, megatron datasets."""
