"""The old import path of FakeClock, wait_for and the line-echo server: import from tests.support instead.

Kept so test files written against it still import; delete once none does.
"""

from tests.support.echo_server import *  # noqa: F401,F403
from tests.support.timing import *  # noqa: F401,F403
from tests.support.echo_server import LINE_CLIENT_TIMEOUT as CLIENT_TIMEOUT  # noqa: F401
