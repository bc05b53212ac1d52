"""Images to WebDataset tar shards plus a manifest, on any fsspec URL."""
