"""The export service's fixtures, for the live tests of the client."""

from tests.export.conftest import demo_projects, export_config, make_client

__all__ = ["demo_projects", "export_config", "make_client"]
