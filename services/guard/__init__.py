"""guard: request-level checks before any model is called."""
