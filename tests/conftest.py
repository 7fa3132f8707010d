pytest_plugins = ["zsmon.testing"]
