"""One set of exit codes for every command, and the error that carries code 2.

A `UsageError` means nothing was started: bad usage, config, data or path. Commands
turn it into one line on stderr and exit 2, never a traceback.
"""

from __future__ import annotations

import re

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: interrupted, resumable from the last checkpoint


class UsageError(Exception):
    """Bad usage, config, data or path, detected before any work started (exit 2).

    The message must name the key, file or record at fault and what to do about it.
    """

    exit_code = EXIT_USAGE


class TrainingInterrupted(Exception):
    """Raised inside the loop when a stop signal or the time limit ended the run cleanly (exit 75)."""

    exit_code = EXIT_INTERRUPTED


def require_resolvable(cfg: object) -> None:
    """Resolve every interpolation of a composed config now, so one that cannot be resolved (an
    unset `${oc.env:NAME}`, a missing key) is a UsageError naming the key, not a traceback later."""
    from omegaconf import OmegaConf
    from omegaconf.errors import InterpolationResolutionError, OmegaConfBaseException

    try:
        OmegaConf.to_container(cfg, resolve=True)
    except (InterpolationResolutionError, OmegaConfBaseException) as e:
        cause = str(e).splitlines()[0]
        env = re.search(r"Environment variable '([^']+)' not found", cause)
        what = f"environment variable {env.group(1)} is not set" if env else cause
        raise UsageError(f"{getattr(e, 'full_key', None) or 'config'}: {what}") from None
