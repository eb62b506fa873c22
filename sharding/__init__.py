"""Flora's data stages: the catalog (records -> splits) and the sharder (splits -> tar shards).

Sub-packages by role: ``catalog`` (sources, records, licences, regions, dedup + split, lineage),
``download`` (the HTTP fetcher, its SSRF guard and pacing), ``cache`` (the LMDB image cache, the
derived caches' root), ``images`` (the stored JPEG, perceptual hashes), ``format`` (the shard
format's schema, writer and reader), ``build`` (plan, chunk jobs, finalize, object storage). Run as
``flora catalog`` and ``flora build`` (sharding/__main__.py).
"""
