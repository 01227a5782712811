"""Request and response models of the HTTP API (pydantic), kept apart from the database tables.

They import nothing but pydantic, so the Python client (api.client) uses the very same types.
"""
