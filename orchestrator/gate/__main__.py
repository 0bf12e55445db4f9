"""``python -m orchestrator.gate gate ...``: the orchestrator CLI with ``gate`` registered.

Same group options (``--state-dir``, ``--reports-dir``) and behaviour as ``orchestrator gate`` once
orchestrator/cli.py registers the command itself.
"""

from orchestrator.cli import main
from orchestrator.gate.command import gate

if "gate" not in main.commands:
    main.add_command(gate)

if __name__ == "__main__":
    main()
