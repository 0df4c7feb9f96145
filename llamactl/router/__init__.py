"""The OpenAI-compatible router: one endpoint in front of the profiles, with a queue per lane.

Public API: `Router(profiles, backends, RouterConfig())`, `create_app(router)`, the `Backends`
Protocol and `Upstream`, `LaneConfig`, `classify`.
"""

from llamactl.router.app import Router, RouterConfig, create_app
from llamactl.router.backends import Backends, Upstream
from llamactl.router.classifier import classify
from llamactl.router.lane import LaneConfig

__all__ = ["Backends", "LaneConfig", "Router", "RouterConfig", "Upstream", "classify", "create_app"]
