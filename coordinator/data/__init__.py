"""The operator's data tools: preparing a corpus as token shards."""
