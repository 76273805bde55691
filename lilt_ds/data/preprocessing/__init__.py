"""From files to tensors: image decoding and transforms, caption cleaning and tokenization, batching."""
