"""The export service: the HTTP API and the workers that run export jobs; the log's only writer."""
