"""One reader and one writer per artifact (run manifest + shards, heads.json/parquet,
anchors.parquet/json, signals.parquet). Nobody else parses these files."""
