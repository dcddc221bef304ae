"""The model side: checkpoint loading, family adapters, token layout, batch building, tiny
checkpoint builders. Everything that knows transformers' module tree lives here."""
