"""The state one ``d2merge`` invocation shares between the entry point and its commands.

``DEBUG``: tracebacks on (``--debug``, ``D2MERGE_DEBUG``); ``STARTED``: when ``main()`` began (the
demo says how long its user waited). Dicts, so a test can set them in place.
"""

from __future__ import annotations

import os
import time

DEBUG = {"on": bool(os.environ.get("D2MERGE_DEBUG"))}
STARTED = {"at": time.monotonic()}
