"""executor: runs admitted tasks as steps on agent workers, with retries and breaker checks."""
