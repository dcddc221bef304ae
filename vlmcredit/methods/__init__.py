"""Credit-signal methods: one module per method, all registered in `registry`."""
