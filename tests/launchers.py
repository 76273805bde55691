"""The commands of launch/ as modules, for tests that call their ``main(argv)`` in this process."""

import importlib.util
import os
import sys

LAUNCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch")


def launcher(name: str):
    """``launch/<name>.py`` imported (its ``if __name__ == "__main__"`` block does not run)."""
    if LAUNCH not in sys.path:
        sys.path.insert(0, LAUNCH)  # the scripts import their shared _cli module as a sibling
    spec = importlib.util.spec_from_file_location(f"launch_{name}", os.path.join(LAUNCH, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
