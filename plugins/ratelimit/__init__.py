"""The built-in ``ratelimit`` plugin: token buckets in memory or in Redis, connection
caps, and per-connection shaping."""
