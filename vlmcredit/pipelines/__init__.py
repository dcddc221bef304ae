"""Command pipelines: one run skeleton (open, resume, shard, commit, manifest, progress) and one
module per command. The CLI parses options and calls these; the demo drives them directly."""
