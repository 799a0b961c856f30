"""megatron-core GPT models from our config: building, initialisation, checkpoints."""
