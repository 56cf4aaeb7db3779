"""Input/output: lazy checkpoints, PEFT adapters, GGUF import, atomic output directories."""
