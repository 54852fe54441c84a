"""The loader's two errors, and what parsing a damaged JSON file raises."""


class CheckpointNotFoundError(FileNotFoundError):
    """No usable files: no matching layout, a missing shard, an index naming a missing file, nothing in the cache."""


class CheckpointError(ValueError):
    """Files that exist but cannot be loaded: truncated, corrupt, or not matching the model they are loaded into."""


# invalid JSON, a missing key, or a value of the wrong type where a header or index expects a dict, list or number
MALFORMED = (ValueError, KeyError, TypeError, AttributeError)
