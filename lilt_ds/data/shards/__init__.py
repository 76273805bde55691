"""Tar shards in the WebDataset layout: writing them, finding them, reading them as a dataset, resumably."""
