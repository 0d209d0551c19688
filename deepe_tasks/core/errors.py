"""Every error deepe raises on purpose, under one base class."""

from __future__ import annotations

from redis.exceptions import RedisError


class DeepeError(Exception):
    """Base class for the errors deepe raises on purpose; the message is for people."""


class InvalidParams(DeepeError):
    """Raised when job parameters fail validation at submit."""


class MethodNotFound(DeepeError):
    """Raised when a method name is malformed or names no file in the method store."""


class MethodExists(DeepeError):
    """Raised when `methods new` would overwrite an existing method."""


class JobNotFound(DeepeError):
    """Raised when a job id names no job."""


class JobExists(DeepeError):
    """Raised when a submit names a job id that is already taken."""


class InvalidJobState(DeepeError):
    """Raised when an action does not fit the job's state, such as cancelling a finished job."""


class MethodContractError(DeepeError):
    """Raised when a method breaks the contract (no trainer, a trainer.train() left in, ...)."""


class JobFailed(DeepeError):
    """Raised by the worker task when a job ends as failed; the message names the phase and cause."""


class BrokerUnavailable(DeepeError):
    """Raised when Redis cannot be reached."""


class AttemptFenced(DeepeError):
    """Raised when an attempt finds that another attempt owns its job now (its lease was lost)."""


class ConfigError(DeepeError):
    """Raised when deepe's settings cannot work together (a sentinel URL without its master name, ...)."""


class NotReplicated(BrokerUnavailable, RedisError):
    """Raised when a write did not reach DEEPE_REDIS_MIN_REPLICAS replicas in time: a failover
    could lose it, so it does not count as done. A RedisError too: whoever rides out a Redis
    outage rides this out the same way."""
