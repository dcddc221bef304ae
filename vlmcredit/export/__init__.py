"""The trainer contract: signals.parquet writer/reader, TRL and VERL adapters."""
