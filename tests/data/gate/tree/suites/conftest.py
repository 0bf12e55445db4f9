pytest_plugins = ["agent.plugin"]
