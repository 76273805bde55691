"""Evaluation data: retrieval (the original format) and zero-shot classification (ImageFolder or JSON)."""
