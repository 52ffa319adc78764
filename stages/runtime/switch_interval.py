"""How long a stage process's Python threads may hold the GIL while another one waits for it.

A stage process steps its worker on one thread, beside its link threads (ZeroMQ in and out),
and with `--colocate-encoders` beside an encoder's own step loop and preprocessing pool. The
step loop hands the GIL away whenever it waits on the device; when the device is done, it
waits for the GIL again, and a thread running pure Python keeps it for Python's switch
interval before it must hand it back: 5 ms by default, as long as a whole 7B decode step on an
H200. The device then idles while the host has not yet queued the step after next. A shorter
interval bounds that wait; the price, more frequent hand-overs between busy threads, is a few
microseconds each.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

ENV = "OMNI_GIL_SWITCH_INTERVAL_US"
DEFAULT_US = 500
# Python's own default is 5,000; past a second the setting only starves threads.
MAX_US = 1_000_000


def configured_switch_interval(environ: Mapping[str, str]) -> float:
    """The interval in seconds that `environ` asks for (ENV, microseconds), else the default."""
    raw = environ.get(ENV, "").strip()
    if not raw:
        return DEFAULT_US / 1e6
    try:
        micros = int(raw)
    except ValueError:
        raise ValueError(f"{ENV} is {raw!r}; it must be a whole number of microseconds") from None
    if not 1 <= micros <= MAX_US:
        raise ValueError(f"{ENV} is {micros}; it must be in [1, {MAX_US}] microseconds")
    return micros / 1e6


def apply_switch_interval(environ: Mapping[str, str] | None = None) -> float:
    """Sets this process's switch interval from `environ` (the process's own by default)."""
    seconds = configured_switch_interval(os.environ if environ is None else environ)
    sys.setswitchinterval(seconds)
    return seconds
