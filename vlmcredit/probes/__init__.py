"""Everything that runs the model: loading, family adapters, token layout, capture, ablation."""
