"""Code both services share that is not contract: database, logging, configuration helpers."""
