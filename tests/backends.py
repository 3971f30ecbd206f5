"""The old import path of the backends and the raw client: import from tests.support instead.

Kept so test files written against it still import; delete once none does.
"""

from tests.support.backends import *  # noqa: F401,F403
from tests.support.client import *  # noqa: F401,F403
from tests.support.ports import free_port as closed_port  # noqa: F401
