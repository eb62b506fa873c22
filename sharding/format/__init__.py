"""The shard format: its schema (layout, keys, samples, index files, sample tables, manifest), its
writer and its reader."""
