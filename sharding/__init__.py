"""Flora's data stages: the catalog (records -> splits) and, later, the sharder (splits -> tar shards).

Run as ``flora catalog --source SOURCE --out DIR``; see sharding/__main__.py.
"""
