"""Exception types. Every message names the file, shard, key or array at fault and what to do."""
from __future__ import annotations


class PipelineError(Exception):
    """Base class: the message says which file/shard/key is at fault and what to do."""


class ShardError(PipelineError):
    """A tar shard is structurally bad: truncated, duplicate key, dotted basename, missing caption."""


class SampleDecodeError(PipelineError):
    """One sample's image could not be decoded."""

    def __init__(self, shard: str, key: str, reason: str) -> None:
        super().__init__(f"shard {shard}, key {key}: image could not be decoded ({reason})")
        self.shard, self.key, self.reason = shard, key, reason

    def __reduce__(self):  # raised in a worker process, re-raised in the driver
        return (type(self), (self.shard, self.key, self.reason))


class CacheError(PipelineError):
    """A cache is missing, corrupt, incomplete or of an unknown schema."""


class FingerprintMismatchError(CacheError):
    """A cache was built from another dataset, teacher or schema."""

    def __init__(self, what: str, path: str, expected: str, found: str, hint: str = "") -> None:
        msg = (
            f"{path}: {what} fingerprint mismatch\n  expected: {expected}\n  found:    {found}"
        )
        super().__init__(msg + (f"\n  {hint}" if hint else ""))
        self.what, self.expected, self.found = what, expected, found
        self._args = (what, path, expected, found, hint)

    def __reduce__(self):  # raised in a worker process, re-raised in the driver
        return (type(self), self._args)


class ConfigError(PipelineError):
    """params.yaml holds an unknown key or a bad value."""
