# Tests marked `lab` run inside the lab VM (see pcipass.lab.pytest_plugin).
pytest_plugins = ["pcipass.lab.pytest_plugin"]
