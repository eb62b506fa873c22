"""Caches: the sharder's LMDB image cache (URL -> image) and the derived caches' cache root."""
