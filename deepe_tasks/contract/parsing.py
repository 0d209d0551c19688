"""A method's source parsed once: submit's checks (the static check, the declared parameters,
the DeepExtension test, its flags) and the job process's read the same tree.

The trees are shared between callers, so they are only read, never changed. A source that does
not parse is not cached: each call raises again, as `ast.parse` does.
"""

from __future__ import annotations

import ast
import functools

# Trees kept: one submit needs one; a few more serve the next submits of the same methods.
CACHED = 8
UNKNOWN = "<unknown>"  # ast.parse's file name when given none


@functools.lru_cache(maxsize=CACHED)
def _parse(source: str) -> ast.Module:
    return ast.parse(source)


def parse(source: str, filename: str = UNKNOWN) -> ast.Module:
    """``ast.parse(source, filename=filename)``, from the cache when this source was parsed before.

    The tree is shared: read it, never change it.
    """
    try:
        return _parse(source)
    except SyntaxError:
        if filename == UNKNOWN:
            raise
    # Raised again under the caller's file name, as ast.parse(source, filename) raises it.
    return ast.parse(source, filename=filename)
