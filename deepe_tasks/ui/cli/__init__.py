"""The `deepe` command line. Exit codes: 0 success, 1 the job failed, 2 bad usage or input.

Each module adds its commands to the Typer app of `common` when imported.
"""

from __future__ import annotations

import sys

from deepe_tasks.core.errors import DeepeError
from deepe_tasks.core.settings import get_settings, safe_url
from deepe_tasks.ui.cli import evals, jobs, methods, serve
from deepe_tasks.ui.cli.common import EXIT_FAILED, EXIT_USAGE, app, show_error

__all__ = ["app", "main", "evals", "jobs", "methods", "serve"]


def main() -> None:
    import redis

    try:
        app()
    except DeepeError as e:
        show_error(str(e))
        sys.exit(EXIT_USAGE)
    except (redis.ConnectionError, redis.TimeoutError) as e:
        show_error(f"Redis at {safe_url(get_settings().redis_url)} cannot be reached ({e}); start it, "
                   "or point DEEPE_REDIS_URL at a running one.")
        sys.exit(EXIT_USAGE)
    except redis.RedisError as e:
        show_error(f"Redis at {safe_url(get_settings().redis_url)} refused the request ({e}); "
                   "check that DEEPE_REDIS_URL names deepe's Redis and that its user may run it.")
        sys.exit(EXIT_FAILED)


if __name__ == "__main__":
    main()
