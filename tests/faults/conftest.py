"""Fault tests run the services as OS processes on the demo projects of the export tests."""

from tests.export.conftest import demo_projects, export_config

__all__ = ["demo_projects", "export_config"]
