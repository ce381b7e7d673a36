"""The small kit every Corral service uses: config, bus, consume loop, tracing, tokens."""
