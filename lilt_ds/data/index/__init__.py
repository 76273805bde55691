"""The caption index: the original LilT JSON read, validated and packed into memory-mapped arrays,
cached once per source."""
