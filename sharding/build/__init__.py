"""The sharder: plan, chunk jobs, finalize, incremental builds, object storage, the lock, distribution."""
