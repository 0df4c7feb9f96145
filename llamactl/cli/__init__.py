"""The command line. `main` (cli/main.py) is the entry point; each module beside it adds its commands."""

import os

# pydantic looks for plugins among every installed package's entry points when the first model class is made:
# about 20 ms of every command, and llamactl uses none. A value the user set is kept.
os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")

from llamactl.cli import engines, hub, lifecycle, profiles  # noqa: F401 - they register their commands on main
from llamactl.cli.main import main
from llamactl.cli.plan import gpus_command, plan_command
from llamactl.cli.serve import serve_command, switch_command
from llamactl.cli.top import top_command
from llamactl.cli.systemd import systemd_command
from llamactl.cli.worker import worker_command

main.add_command(plan_command, "plan")
main.add_command(gpus_command, "gpus")
main.add_command(serve_command, "serve")
main.add_command(switch_command, "switch")
main.add_command(top_command, "top")
main.add_command(systemd_command, "systemd")
main.add_command(worker_command, "worker")

__all__ = ["main"]
