"""Models: loading base models and tokenizers, PEFT adapters, export, and the tiny-model builder."""
