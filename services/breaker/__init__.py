"""breaker: per-dependency circuit state from step outcomes, shared through a KV bucket."""
