"""Teacher logits: top-p-k truncation, and (later) the offline store's format, writer, reader."""
