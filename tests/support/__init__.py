"""Shared test helpers, imported by test modules as `tests.support.<module>`.

Plain functions and constants live here; the fixtures of `families`, `pages` and `servers`
are registered once for the whole suite as plugins (`pytest_plugins` in tests/conftest.py),
so a test asks for them by name and imports nothing. Test modules never import each other
or tests/conftest.py (tests/unit/test_test_layout.py checks).
"""
