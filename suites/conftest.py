"""Every suite runs under the pmufarm plugin (docs/contracts.md §4)."""

pytest_plugins = ["agent.plugin"]
