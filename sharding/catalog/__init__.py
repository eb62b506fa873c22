"""The catalog: record sources, the record schema, licences, regions, dedup + split, lineage."""
