# zsmon's fixtures (db_url, writer, make_config, run_check, ...) for a plugin's own tests.
pytest_plugins = ["zsmon.testing"]
