"""Hugging Face adapters: model specs and builders, tokenizers, chat templates, the hub."""
