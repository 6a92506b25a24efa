"""Hypothesis settings for the unit tests.

The machine is small and shared (2 cores, other suites running): a per-example deadline
would turn load into failures that say nothing about the code, so the profile has none. Each
test still bounds its work through max_examples, and pytest-timeout bounds the whole test.
A test that sets its own @settings(deadline=...) keeps it.
"""

from hypothesis import HealthCheck, settings

settings.register_profile("tsproxy-unit", deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("tsproxy-unit")
