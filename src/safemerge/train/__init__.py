"""Fine-tuning: chat-formatted SFT data with masked prompts and PEFT LoRA training."""
from safemerge.train.tokenize import IGNORE_INDEX, collate, encode_chat_example  # noqa: F401
