"""monitor: every event in; latency, error rate, tokens, cost, queue depth and breakers out."""
