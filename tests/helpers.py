"""Plain helpers shared by the tests (the fixtures are in conftest.py)."""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root
